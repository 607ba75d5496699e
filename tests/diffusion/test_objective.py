"""The masked-diffusion objective, against a plain reading of docs/design.md §4.1."""

import jax
import jax.numpy as jnp
import numpy as np

from lladav_jax.diffusion import objective

MASK = 99


def test_forward_mask_respects_targets_and_segments():
    rng = jax.random.key(0)
    tokens = jnp.arange(2 * 200).reshape(2, 200) % 50
    targets = (jnp.arange(200) % 3 != 0)[None].repeat(2, 0)
    segments = jnp.concatenate([jnp.ones((2, 120), jnp.int32), jnp.full((2, 80), 2)], axis=1)
    noisy, masked, p = objective.forward_mask(rng, tokens, targets, segments, MASK)
    assert not bool(jnp.any(masked & ~targets))  # non-targets are never masked
    assert bool(jnp.all(jnp.where(masked, noisy == MASK, noisy == tokens)))
    assert bool(jnp.all(p >= objective.EPS)) and bool(jnp.all(p <= 1))
    # One t per sample: p is constant within a segment and differs between them.
    for row in range(2):
        assert len(np.unique(np.asarray(p[row, :120]))) == 1
        assert p[row, 0] != p[row, 150]
    # Over many draws the masked share matches p_mask.
    draws = [objective.forward_mask(jax.random.key(i), tokens, targets, segments, MASK)
             for i in range(200)]
    share = np.mean([float(m[0, :120][targets[0, :120]].mean()) for _, m, _ in draws])
    mean_p = np.mean([float(q[0, 0]) for _, _, q in draws])
    assert abs(share - mean_p) < 0.02


def reference_loss(logits, tokens, masked, p_mask, targets) -> float:
    """LLaDA's SFT loss, one sample per row, in plain numpy."""
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total = 0.0
    for b in range(tokens.shape[0]):
        l_ans = targets[b].sum()
        for i in np.nonzero(masked[b])[0]:
            total += -logp[b, i, tokens[b, i]] / p_mask[b, i] / l_ans
    return total / tokens.shape[0]


def test_loss_matches_the_formula_with_no_shift():
    rng = np.random.default_rng(0)
    b, n, v = 3, 12, 17
    logits = rng.normal(size=(b, n, v)).astype(np.float32)
    tokens = rng.integers(0, v, (b, n))
    targets = rng.random((b, n)) < 0.6
    masked = targets & (rng.random((b, n)) < 0.5)
    p_mask = np.repeat(rng.uniform(0.1, 1, (b, 1)), n, 1).astype(np.float32)
    seg = np.ones((b, n), np.int32)
    total, count = objective.loss_terms(logits, tokens, masked, p_mask, targets, seg)
    np.testing.assert_allclose(float(total / count),
                               reference_loss(logits, tokens, masked, p_mask, targets), rtol=1e-5)
    # Position i predicts token i: a logit spike there drives its term to ~0.
    sharp = logits.copy()
    sharp[np.arange(b)[:, None], np.arange(n)[None], tokens] = 50.0
    assert float(objective.loss_terms(sharp, tokens, masked, p_mask, targets, seg)[0]) < 1e-6


def test_packed_rows_equal_separate_rows():
    rng = np.random.default_rng(1)
    n, v = 10, 7
    parts = []
    for _ in range(2):
        logits = rng.normal(size=(1, n, v)).astype(np.float32)
        tokens = rng.integers(0, v, (1, n))
        targets = rng.random((1, n)) < 0.7
        masked = targets & (rng.random((1, n)) < 0.6)
        p = np.full((1, n), rng.uniform(0.2, 1), np.float32)
        parts.append((logits, tokens, masked, p, targets))
    alone = [objective.loss_terms(*x, np.ones((1, n), np.int32)) for x in parts]
    cat = [np.concatenate(xs, axis=1) for xs in zip(*parts)]
    pad = lambda x, value: np.concatenate([x, np.full((1, 3, *x.shape[2:]), value, x.dtype)], 1)
    logits, tokens, masked, p, targets = (pad(cat[0], 0), pad(cat[1], 0), pad(cat[2], False),
                                          pad(cat[3], 1), pad(cat[4], False))
    seg = np.concatenate([np.full(n, 1), np.full(n, 2), np.zeros(3)]).astype(np.int32)[None]
    total, count = objective.loss_terms(logits, tokens, masked, p, targets, seg)
    assert float(count) == 2
    np.testing.assert_allclose(float(total), sum(float(t) for t, _ in alone), rtol=1e-6)
