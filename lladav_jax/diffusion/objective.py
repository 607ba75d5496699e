"""The masked-diffusion objective of LLaDA / LLaDA-V in its SFT form (docs/design.md §4.1), pure.

Per sample: t ~ U(0, 1), p_mask = (1 - eps) t + eps; every target position is replaced by the
mask token with probability p_mask (other positions never are). The loss is

    sum over masked positions of CE(logits_i, token_i) / p_mask / L_ans,  averaged over samples,

with L_ans the sample's number of target positions, and no logit shift (position i predicts
token i). A packed row holds several samples (segments): each gets its own t and L_ans.
Sums and sample counts are returned apart, so that gradient accumulation and any number of
devices divide by the same global count.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

EPS = 1e-3


def segment_values(per_segment: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, L] values indexed by segment id (per_segment is [B, L]; id 0 = padding)."""
    return jnp.take_along_axis(per_segment, segment_ids, axis=1)


def segment_counts(mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, L] per-segment number of True positions of `mask` (index = segment id)."""
    b, n = mask.shape
    return jnp.zeros((b, n), jnp.int32).at[jnp.arange(b)[:, None], segment_ids].add(
        mask.astype(jnp.int32)
    )


def forward_mask(
    rng: jax.Array,
    tokens: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
    mask_id: int,
    eps: float = EPS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward process. Returns (noisy tokens, masked [B, L] bool, p_mask [B, L])."""
    t_rng, m_rng = jax.random.split(rng)
    t = jax.random.uniform(t_rng, tokens.shape)  # one t per (row, segment id)
    p_mask = segment_values((1.0 - eps) * t + eps, segment_ids)
    masked = targets & (jax.random.uniform(m_rng, tokens.shape) < p_mask)
    return jnp.where(masked, mask_id, tokens), masked, p_mask


def complementary_masks(
    rng: jax.Array,
    tokens: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
    mask_id: int,
    eps: float = EPS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LaViDa's complementary masking (docs/design.md §4.4): (noisy, masked, p_mask), each
    [2, B, L]. Copy 1 ([0]) is `forward_mask`; copy 2 ([1]) masks exactly the targets copy 1
    left visible, so every target is masked in exactly one copy.

    Given t, copy 2 masks each target with probability 1 - p_mask, so its weight is
    1 / (1 - p_mask): with it `loss_terms` of either copy is an unbiased estimate of the same
    1/t-weighted objective (copy 2's rate (1 - eps)(1 - t) is uniform on (0, 1 - eps]).
    The rate is clipped below at eps, as copy 1's p_mask is: the weight stays <= 1 / eps
    (as t -> 1 it would be unbounded), biased only for t > 1 - eps / (1 - eps), a ~eps share.
    """
    noisy, masked, p_mask = forward_mask(rng, tokens, targets, segment_ids, mask_id, eps)
    masked2 = targets & ~masked
    p_mask2 = jnp.maximum(1.0 - p_mask, eps)
    noisy2 = jnp.where(masked2, mask_id, tokens)
    return jnp.stack([noisy, noisy2]), jnp.stack([masked, masked2]), jnp.stack([p_mask, p_mask2])


def loss_terms(
    logits: jax.Array,
    tokens: jax.Array,
    masked: jax.Array,
    p_mask: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(sum over samples of each sample's loss, number of samples with targets).

    loss = first / second. Cross-entropy in float32 whatever the compute dtype.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    weight, samples = loss_weights(masked, p_mask, targets, segment_ids)
    return jnp.sum(ce * weight), samples


def loss_weights(masked: jax.Array, p_mask: jax.Array, targets: jax.Array,
                 segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(each position's weight [B, L]: 1 / (p_mask L_ans) where masked, else 0; the number of
    samples with targets)."""
    per_segment = segment_counts(targets, segment_ids)
    l_ans = segment_values(per_segment, segment_ids)
    weight = jnp.where(masked, 1.0 / (p_mask * jnp.maximum(l_ans, 1)), 0.0)
    samples = jnp.sum(per_segment.at[:, 0].set(0) > 0)  # id 0 is padding
    return weight, samples.astype(jnp.float32)


def head_loss_terms(
    hidden: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    tokens: jax.Array,
    masked: jax.Array,
    p_mask: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """`loss_terms(head(hidden), ...)` with the head run only where the loss is: each row's
    masked positions, gathered `chunk` at a time per row (chunks past every row's last masked
    position are skipped). Each chunk's [B, chunk, vocab] logits are recomputed in the backward
    pass, never stored: logit memory is O(B * chunk * vocab) instead of O(B * L * vocab), and
    the head's work follows the largest masked count of a row instead of L. Rows stay where
    they are (a batch-sharded mesh gathers nothing across devices).

    hidden [B, L, D] (final-norm states); head maps [B, N, D] -> [B, N, vocab]."""
    weight, samples = loss_weights(masked, p_mask, targets, segment_ids)
    b, n = masked.shape
    slots = -(-n // chunk) * chunk
    # Each row's masked positions first (in order), then filler (position 0, not counted).
    where = jax.vmap(lambda m: jnp.nonzero(m, size=slots, fill_value=0)[0])(masked)
    live = jnp.arange(slots)[None] < jnp.sum(masked, axis=1, keepdims=True)
    by_chunk = lambda x: x.reshape(b, -1, chunk).swapaxes(0, 1)  # [chunks, B, chunk]

    @jax.checkpoint
    def chunk_sum(at: jax.Array, real: jax.Array) -> jax.Array:
        pick = lambda x: jnp.take_along_axis(x, at, axis=1)
        logits = head(jnp.take_along_axis(hidden, at[..., None], axis=1)).astype(jnp.float32)
        own = jnp.take_along_axis(logits, pick(tokens)[..., None], axis=-1)[..., 0]
        ce = jax.nn.logsumexp(logits, axis=-1) - own
        return jnp.sum(jnp.where(real, ce * pick(weight), 0.0))

    def step(total: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        at, real = xs
        part = jax.lax.cond(jnp.any(real), chunk_sum, lambda *_: jnp.float32(0), at, real)
        return total + part, None

    total, _ = jax.lax.scan(step, jnp.float32(0), (by_chunk(where), by_chunk(live)))
    return total, samples
