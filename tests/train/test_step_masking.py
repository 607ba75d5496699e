"""The train step's masking modes on the tiny model, in process: the ordinary step and
complementary masking (docs/design.md §4.4, train.complementary_masking) against a plain
recomputation of their loss from the same keys; the head run only where the loss is
(train.head_chunk) against the head everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lladav_jax.data.example import BATCH_KEYS
from lladav_jax.diffusion import objective
from lladav_jax.models import lladav
from lladav_jax.train import optim
from lladav_jax.train.defaults import demo
from lladav_jax.train.inputs import load_tokenizer, make_batches
from lladav_jax.train.step import MODEL_KEYS, TrainState, make_train_step, split_accum


@pytest.fixture(scope="module")
def setup():
    c = demo()  # the tiny model, one tile
    c.data.seq_len, c.data.length_buckets, c.data.answer_window = 64, (64,), 0  # 64-token rows
    c.data.size, c.data.batch_size, c.data.window = 16, 4, 8
    tok = load_tokenizer("")
    batch = next(iter(make_batches(c, tok)[0]))
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in BATCH_KEYS}
    tx, _ = optim.make_optimizer(c.optim, 10)
    model = lladav.LLaDAV(c.model, rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(c.optim.lr), ...)
    state = TrainState(jnp.int32(0), trainable, tx.init(trainable), jax.random.key(3))
    return model, graphdef, tx, state, frozen, batch, tok.mask_id


@pytest.fixture(scope="module")
def compiled(setup):
    """step(complementary, head_chunk): the jitted train step, compiled once for the module's
    tests (each compile takes seconds)."""
    _, graphdef, tx, _, _, _, mask_id = setup
    cache = {}

    def step(complementary: bool, head_chunk: int = 0):
        if (complementary, head_chunk) not in cache:
            cache[complementary, head_chunk] = jax.jit(make_train_step(
                graphdef, tx, mask_id, complementary, head_chunk=head_chunk))
        return cache[complementary, head_chunk]

    return step


def reference(model, batch: dict, key: jax.Array, mask_id: int, complementary: bool):
    """(loss sum, samples) recomputed copy by copy, each copy its own B-row forward pass."""
    args = (key, batch["tokens"], batch["targets"], batch["segment_ids"], mask_id)
    if complementary:
        copies = zip(*objective.complementary_masks(*args))
    else:
        copies = [objective.forward_mask(*args)]
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    total = count = 0.0
    for noisy, masked, p in copies:
        logits = model(**{**inputs, "tokens": noisy}, dropout_rng=jax.random.fold_in(key, 1))
        t, n = objective.loss_terms(logits, batch["tokens"], masked, p, batch["targets"],
                                    batch["segment_ids"])
        total, count = total + t, count + n
    return float(total), float(count)


@pytest.mark.parametrize("complementary", [False, True])
def test_step_loss_is_the_objective_of_its_masks(setup, compiled, complementary):
    model, _, _, state, frozen, batch, mask_id = setup
    new, m = compiled(complementary)(state, frozen, split_accum(batch, 1))
    key = jax.random.split(jax.random.split(state.rng)[1], 1)[0]  # the step's micro-batch key
    total, count = reference(model, batch, key, mask_id, complementary)
    assert np.isfinite(float(m["loss"])) and not bool(m["skipped"])
    np.testing.assert_allclose(float(m["loss"]), total / count, rtol=2e-5)
    n_samples = float(objective.loss_terms(  # samples with targets, once
        jnp.zeros((*batch["tokens"].shape, 2)), jnp.zeros_like(batch["tokens"]),
        batch["targets"], jnp.ones(batch["tokens"].shape), batch["targets"],
        batch["segment_ids"])[1])
    assert float(m["samples"]) == count == (2 if complementary else 1) * n_samples
    if complementary:  # every answer token is masked in exactly one copy
        assert int(m["masked_tokens"]) == int(jnp.sum(batch["targets"]))
    assert int(new.step) == 1


@pytest.mark.parametrize("complementary", [False, True])
def test_head_only_where_the_loss_is_gives_the_same_step(setup, compiled, complementary):
    """train.head_chunk: the loss, the gradient norm and the updated parameters of one step
    equal the full head's (float32)."""
    _, _, _, state, frozen, batch, _ = setup
    micro = split_accum(batch, 1)
    full, m_full = compiled(complementary)(state, frozen, micro)
    part, m_part = compiled(complementary, head_chunk=4)(state, frozen, micro)
    assert int(m_part["masked_tokens"]) > 4 * len(batch["tokens"])  # several chunks a row
    np.testing.assert_allclose(float(m_part["loss"]), float(m_full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_part["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(part.trainable), jax.tree.leaves(full.trainable), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
