"""The sampler's cache policies (`diffusion/cache_policy.py`): the drift measure, the adaptive
refresh at its two extremes, and the block loop ending once every row is done."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lladav_jax.diffusion import cache_policy, sampler
from lladav_jax.diffusion.options import CACHES, SamplerOptions
from tests.diffusion import test_sampler
from tests.diffusion.test_sampler import check_valid, run, stopped

world = test_sampler.world  # the same models and prompts, built once for this file

OPTIONS = dict(gen_length=24, block_length=8, steps=12)


def test_drift():
    """1 - cosine over each position's heads, averaged over a row's masked positions, the
    largest over layers, rows, keys and values; 0 where nothing is masked."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 3, 2, 4, 2, 5)).astype(np.float32)  # [kv, layers, B, n, H, D]
    masked = np.array([[True, True, False, False], [False, False, False, True]])
    assert float(cache_policy.drift(ref, ref, masked)) == pytest.approx(0.0, abs=1e-6)
    assert float(cache_policy.drift(ref, 2.5 * ref, masked)) == pytest.approx(0.0, abs=1e-6)
    fresh = ref.copy()
    fresh[1, 2, 0, 0] = -ref[1, 2, 0, 0]  # values, layer 2, row 0, position 0: cosine -1
    assert float(cache_policy.drift(fresh, ref, masked)) == pytest.approx(1.0, abs=1e-6)
    fresh[1, 2, 0, 0] = ref[1, 2, 0, 0]
    fresh[0, 0, 0, 2] = -ref[0, 0, 0, 2]  # an unmasked position: not counted
    assert float(cache_policy.drift(fresh, ref, masked)) == pytest.approx(0.0, abs=1e-6)
    fresh[0, 0, 1, 3] = -ref[0, 0, 1, 3]  # row 1's only masked position
    assert float(cache_policy.drift(fresh, ref, masked)) == pytest.approx(2.0, abs=1e-6)
    assert float(cache_policy.drift(fresh, ref, np.zeros_like(masked))) == 0.0


def test_policies_listed():
    assert CACHES == tuple(cache_policy.POLICIES) == ("none", "prefix", "dual", "adaptive")
    with pytest.raises(ValueError, match=r"refresh_threshold=-0.1: must be >= 0"):
        SamplerOptions(cache="adaptive", refresh_threshold=-0.1)


@pytest.mark.slow
def test_adaptive_at_threshold_zero_is_the_uncached_sampler(world):
    """Refreshing whenever anything drifted: every step runs on an exact cache, so the tokens
    and the steps that committed them are those of no cache, and every step is a full pass."""
    none = run(world, "sharp", cache="none", **OPTIONS)
    got = run(world, "sharp", cache="adaptive", refresh_threshold=0.0, **OPTIONS)
    np.testing.assert_array_equal(got["tokens"], none["tokens"])
    np.testing.assert_array_equal(got["committed_at"], none["committed_at"])
    assert int(got["refreshes"]) == int(got["steps"]) == 12
    assert int(none["refreshes"]) == 12


@pytest.mark.slow
def test_adaptive_never_refreshing(world):
    """With a threshold nothing reaches, the cache is filled once. Over one block that is the
    dual cache exactly; over three blocks it decodes validly with one full pass (dual runs one
    a block: tests/test_accelerator_suite.py counts them)."""
    one_block = dict(gen_length=8, block_length=8, steps=4)
    dual = run(world, "sharp", cache="dual", **one_block)
    got = run(world, "sharp", cache="adaptive", refresh_threshold=1e9, **one_block)
    np.testing.assert_array_equal(got["tokens"], dual["tokens"])
    np.testing.assert_array_equal(got["committed_at"], dual["committed_at"])
    assert int(got["refreshes"]) == int(dual["refreshes"]) == 1
    three = run(world, "sharp", cache="adaptive", refresh_threshold=1e9, **OPTIONS)
    check_valid(three, world["ids"], world["cfg"].text.vocab_size)
    assert int(three["refreshes"]) == 1
    # Between the two: some steps refreshed, not all.
    some = run(world, "sharp", cache="adaptive", refresh_threshold=0.02, **OPTIONS)
    check_valid(some, world["ids"], world["cfg"].text.vocab_size)
    assert 1 <= int(some["refreshes"]) <= 12


@pytest.mark.slow
def test_blocks_stop_once_every_row_is_done(world):
    """Every row ends in the first block: no later block runs a step, and on_block is called
    for the first block only."""
    ids = world["ids"]
    calls = []
    options = SamplerOptions(cache="dual", **OPTIONS)
    f = sampler.compiled_generate(world["ours"]["eot_strong"], options, ids,
                                  on_block=lambda b, t: calls.append(int(b)))
    out = {k: np.asarray(v) for k, v in f(world["prompt"], jax.random.key(0)).items()}
    jax.effects_barrier()
    assert stopped(out["tokens"], ids).all()
    assert (out["tokens"][:, 8:] == ids.mask).all()
    assert calls == [0] and int(out["steps"]) <= 4 and int(out["refreshes"]) == 1
    assert jnp.all(out["committed_at"][:, 8:] == -1)


def test_batch_sizes():
    assert sampler.batch_sizes(1) == (1,)
    assert sampler.batch_sizes(3) == (1, 2, 3)
    assert sampler.batch_sizes(8) == (1, 2, 4, 8)
    assert sampler.batch_sizes(6) == (1, 2, 3, 6)


@pytest.mark.slow
def test_shrinking_the_batch_changes_no_answer(world):
    """One row ends in the first block, the others decode to the end: with finished rows
    leaving the batch between blocks (3 rows, then 2), every row commits the same tokens at the
    same steps. Under the adaptive policy, whose drift reference is gathered and scattered with
    the rows too."""
    options = dict(gen_length=24, block_length=4, steps=12, cache="adaptive")
    whole = run(world, "eot", **options)
    assert stopped(whole["tokens"], world["ids"]).tolist() == [False, True, False]
    assert (whole["tokens"][1, 4:] == world["ids"].mask).all()  # done in the first block
    shrunk = run(world, "eot", shrink_batch=True, **options)
    np.testing.assert_array_equal(shrunk["tokens"], whole["tokens"])
    np.testing.assert_array_equal(shrunk["committed_at"], whole["committed_at"])
    assert int(shrunk["steps"]) == int(whole["steps"])
