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


def packed_padded_batch():
    """2 rows: two packed samples then padding (segment 0, never a target)."""
    tokens = jnp.arange(2 * 64).reshape(2, 64) % 50
    segments = jnp.concatenate([jnp.ones((2, 30), jnp.int32), jnp.full((2, 24), 2),
                                jnp.zeros((2, 10), jnp.int32)], axis=1)
    targets = (jnp.arange(64) % 4 != 0)[None].repeat(2, 0) & (segments > 0)
    return tokens, targets, segments


def test_complementary_masks_partition_the_targets():
    tokens, targets, segments = packed_padded_batch()
    for seed in range(8):
        noisy, masked, p = objective.complementary_masks(jax.random.key(seed), tokens, targets,
                                                         segments, MASK)
        assert masked.shape == (2, *tokens.shape)
        # Copy 1 is the ordinary forward process, bit for bit.
        one = objective.forward_mask(jax.random.key(seed), tokens, targets, segments, MASK)
        for got, want in zip((noisy[0], masked[0], p[0]), one):
            np.testing.assert_array_equal(got, want)
        # Disjoint, covering every target, nothing outside (padding and prompts included).
        assert not bool(jnp.any(masked[0] & masked[1]))
        np.testing.assert_array_equal(masked[0] | masked[1], targets)
        for c in range(2):
            assert bool(jnp.all(jnp.where(masked[c], noisy[c] == MASK, noisy[c] == tokens)))
        # Per packed segment too: each sample's targets split between the copies.
        for s in (1, 2):
            seg = segments == s
            np.testing.assert_array_equal((masked[0] | masked[1]) & seg, targets & seg)
        np.testing.assert_allclose(p[1], np.maximum(1 - np.asarray(p[0]), objective.EPS))


def test_complementary_weights_are_one_over_each_copys_rate():
    """Hand-made logits: CE_i = c_i known. With the t drawn (p_mask read back), copy 1's loss
    is sum_{masked 1} c_i / p / L and copy 2's sum_{masked 2} c_i / (1 - p) / L."""
    n, v = 40, 5
    tokens = jnp.asarray(np.arange(n) % v)[None]
    targets = jnp.asarray(np.arange(n) >= 8)[None]  # 8 prompt positions, 32 answer ones
    segments = jnp.ones((1, n), jnp.int32)
    logits = np.zeros((1, n, v), np.float32)
    logits[0, np.arange(n), np.arange(n) % v] = np.linspace(0, 3, n)  # CE varies by position
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -logp[0, np.arange(n), np.arange(n) % v]
    l_ans = 32
    for seed in range(5):
        _, masked, p = objective.complementary_masks(jax.random.key(seed), tokens, targets,
                                                     segments, MASK)
        p0 = float(p[0, 0, 0])
        for c, rate in ((0, p0), (1, max(1 - p0, objective.EPS))):
            total, count = objective.loss_terms(logits, tokens, masked[c], p[c], targets,
                                                segments)
            want = ce[np.asarray(masked[c, 0])].sum() / rate / l_ans
            assert float(count) == 1
            np.testing.assert_allclose(float(total), want, rtol=1e-5)
    # Unbiased: over many t, either copy's mean loss is the mean answer CE (a long answer
    # keeps the masked share close to its rate, so few draws suffice).
    n, v = 400, 5
    tokens = jnp.asarray(np.arange(n) % v)[None]
    targets, segments = jnp.ones((1, n), bool), jnp.ones((1, n), jnp.int32)
    logits = np.zeros((1, n, v), np.float32)
    logits[0, np.arange(n), np.arange(n) % v] = 1.0  # the same CE everywhere
    c_ce = float(np.log(np.exp(1.0) + v - 1) - 1.0)

    @jax.jit
    def copy_losses(key):
        _, masked, p = objective.complementary_masks(key, tokens, targets, segments, MASK)
        return jnp.stack([objective.loss_terms(logits, tokens, masked[c], p[c], targets,
                                               segments)[0] for c in range(2)])

    losses = np.array([copy_losses(jax.random.key(s)) for s in range(300)])
    np.testing.assert_allclose(losses.mean(0), [c_ce, c_ce], rtol=0.05)


def test_complementary_rate_is_clipped_at_eps(monkeypatch):
    """t near 1 (p_mask -> 1): copy 2's rate stops at eps, its weight at 1 / eps."""
    tokens, targets, segments = packed_padded_batch()
    almost_one = jnp.full(tokens.shape, 1 - 1e-6)
    monkeypatch.setattr(objective, "forward_mask",
                        lambda *a, **k: (tokens, jnp.zeros_like(targets), almost_one))
    _, masked, p = objective.complementary_masks(jax.random.key(0), tokens, targets, segments,
                                                 MASK)
    np.testing.assert_array_equal(masked[1], targets)
    np.testing.assert_allclose(p[1], objective.EPS)


def test_head_where_the_loss_is_equals_the_full_head():
    """`head_loss_terms` (the head at masked positions only, in chunks that do not divide the
    count) against `loss_terms` over every position: the loss and its gradients with respect to
    the states and the head, in float32, with packed segments and padding."""
    rng = np.random.default_rng(0)
    b, n, d, vocab = 3, 40, 16, 50
    hidden = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, vocab)) / 4, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, (b, n)))
    seg = np.ones((b, n), np.int32)
    seg[0, 25:], seg[1, 30:] = 2, 0
    targets = jnp.asarray((rng.random((b, n)) < 0.5) & (seg > 0))
    seg = jnp.asarray(seg)
    _, masked, p = objective.forward_mask(jax.random.key(1), tokens, targets, seg, MASK)
    n_masked = int(masked.sum())
    assert 0 < n_masked < b * n

    def full(h, w):
        return objective.loss_terms(h @ w, tokens, masked, p, targets, seg)

    want, want_grads = jax.value_and_grad(lambda h, w: full(h, w)[0], (0, 1))(hidden, head)
    for chunk in (7, 16, 2 * n):  # several chunks per row; one chunk wider than a row
        def gathered(h, w, chunk=chunk):
            return objective.head_loss_terms(h, lambda x: x @ w, tokens, masked, p, targets,
                                             seg, chunk)

        got, grads = jax.jit(jax.value_and_grad(lambda h, w: gathered(h, w)[0], (0, 1)))(
            hidden, head)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        assert float(gathered(hidden, head)[1]) == float(full(hidden, head)[1])
        for g, r in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=0)
