"""Which masked positions a denoising step commits, and to what: pure functions of the step's
logits and the sequence (docs/design.md §5.1-5.3), shared by the sampler and its tests.

Every random draw of a row comes from the row's own key (`row_keys`), so a row samples the same
whatever else is in its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lladav_jax.diffusion.options import SpecialIds


def num_transfer_tokens(masked_count: jax.Array, steps: int) -> jax.Array:
    """[B] masked positions of a block -> [B, steps] commits per step, remainder first."""
    base, rem = masked_count // steps, masked_count % steps
    return base[:, None] + (jnp.arange(steps)[None] < rem[:, None]).astype(jnp.int32)


def row_keys(rng: jax.Array, rows: int) -> jax.Array:
    """[rows] random keys: `rng` itself if it is one key per row already, else one key folded
    with each row's index. Every draw of a row comes from its own key, so a row samples the
    same whatever else is in its batch (the server's batches, `Model.generate_batch`)."""
    if rng.ndim:
        if rng.shape != (rows,):
            raise ValueError(f"rng: one key or {rows} (one per row), got shape {rng.shape}")
        return rng
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(rows))


def fold_rows(keys: jax.Array, data) -> jax.Array:
    """Each row's key folded with the same `data` (a block or step index)."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, data)


def uniform_rows(keys: jax.Array, shape: tuple[int, ...], minval: float = 0.0) -> jax.Array:
    """[rows, *shape] uniform draws in [minval, 1), row i from keys[i]."""
    return jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, minval=minval))(keys)


def gumbel_argmax(logits: jax.Array, temperature: float, rng: jax.Array) -> jax.Array:
    """LLaDA's sampling: argmax of exp(logits) / (-log u)^T (plain argmax at T = 0); logits
    [B, ...], rng one key per row [B]."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    u = uniform_rows(rng, logits.shape[1:], minval=1e-20)
    # Same argmax as exp(l) / g^T, in log space: no overflow in float32.
    return jnp.argmax(logits - temperature * jnp.log(-jnp.log(u)), axis=-1)


def select(confidence: jax.Array, k: jax.Array, threshold: float | None) -> jax.Array:
    """Which positions to commit: the k most confident per row (k [B]); with a threshold,
    the most confident one and every other above it. -inf never commits."""
    order = jnp.argsort(-confidence, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    finite = confidence > -jnp.inf
    if threshold is None:
        return finite & (rank < k[:, None])
    return finite & ((rank == 0) | (confidence >= threshold))


def rows_done(gen: jax.Array, ids: SpecialIds) -> jax.Array:
    """[B]: an <|eot_id|> or EOS was committed and nothing before the first one is still
    masked (EOS is only ever committed where `allow_eos` lets it)."""
    is_end = (gen == ids.eot) | (gen == ids.eos)
    first = jnp.argmax(is_end, axis=-1)
    before = jnp.arange(gen.shape[1])[None] < first[:, None]
    return jnp.any(is_end, axis=-1) & ~jnp.any(before & (gen == ids.mask), axis=-1)


def end_last(confidence: jax.Array, x0: jax.Array, masked: jax.Array,
             ids: SpecialIds) -> jax.Array:
    """Under `allow_eos`: a position whose prediction is an end token (EOS, <|eot_id|>) with a
    masked position before it in the block ranks below every other (confidence - 1, scores
    being in [0, 1]), so the answer's length is settled after its content, where it ends. The
    first masked position is never held back, so every step commits as many as it would.

    Why: by confidence alone the far EOS go first, then the EOS right after the answer, whose
    confidence is the model's belief in a short answer; the words were then chosen to fit
    (BENCHMARKS.md, "Answer length")."""
    is_end = (x0 == ids.eot) | (x0 == ids.eos)
    pending = jnp.cumsum(masked, axis=-1) - masked > 0
    return jnp.where(is_end & pending, confidence - 1.0, confidence)
