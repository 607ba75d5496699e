"""When the sampler reuses keys and values, and when it recomputes them (docs/design.md §5.2, §5.8).

Every denoising step of block b needs the block's logits. A step gets them either by a *full
pass* (the whole sequence: exact, and every position's keys/values written into the cache) or by
a *cached pass* (only a chunk of the sequence, attending to the rest through the cache: cheap,
approximate where the cache is stale). A `CachePolicy` decides which, step by step; the sampler
asks it and nothing else, so a new policy is one more entry in `POLICIES` (and its name in
`options.CACHES`).

- `none`: every step a full pass; no cache.
- `prefix`: a full pass at each block's first step; cached passes run the block and everything
  after it (the prefix is cached).
- `dual` (Fast-dLLM): the same, but cached passes run only the block (the suffix is cached too).
- `adaptive`: cached passes run only the block, and the cache is refreshed only when it has gone
  stale. Each cached pass measures its drift: how far the keys/values of the block's
  still-masked positions have moved since the cache was last filled. A masked position's
  input never changes, so its keys/values move only because the context did: the same change
  the cached suffix (all masks) has missed. At `refresh_threshold` or more the step is redone as a
  full pass. The block's own fresh keys/values are kept in the cache, and a block's first step
  runs the block before it too, whose last commits were never run through the model (no full
  pass may have followed them).
  (After Elastic-Cache, which watches attention drift to decide when to recompute; here the
  signal is the keys/values the cached pass computes anyway.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """One way of reusing keys/values across steps.

    cached: False: every step is a full pass and no cache is allocated.
    chunk: what a cached pass runs: "block", or "suffix" (the block and everything after it).
    keeps_block: a cached pass writes the block's fresh keys/values into the cache, and a
        block's first cached pass runs the block before it too (to cache its final tokens).
    measures_drift: each cached pass returns its drift (`drift`), and `refresh_after` may redo
        the step as a full pass.
    """

    name: str
    cached: bool = True
    chunk: str = "block"
    keeps_block: bool = False
    measures_drift: bool = False

    def refresh_before(self, first_step: jax.Array, first_in_block: jax.Array) -> jax.Array:
        """Whether a step starts with a full pass: the generation's first step (the cache is
        empty) and, by default, every block's first step."""
        return first_step | first_in_block

    def refresh_after(self, drift: jax.Array, threshold: float) -> jax.Array:
        """Whether a cached pass whose drift was measured is redone as a full pass."""
        return jnp.zeros((), bool)


@dataclasses.dataclass(frozen=True)
class AdaptivePolicy(CachePolicy):
    """Refreshes only when the measured drift passes the threshold."""

    keeps_block: bool = True
    measures_drift: bool = True

    def refresh_before(self, first_step: jax.Array, first_in_block: jax.Array) -> jax.Array:
        return first_step

    def refresh_after(self, drift: jax.Array, threshold: float) -> jax.Array:
        return drift >= threshold


POLICIES: dict[str, CachePolicy] = {p.name: p for p in (
    CachePolicy("none", cached=False),
    CachePolicy("prefix", chunk="suffix"),
    CachePolicy("dual"),
    AdaptivePolicy("adaptive"),
)}


def block_kv(cache: tuple[jax.Array, jax.Array], start: jax.Array | int,
             length: int) -> jax.Array:
    """The cached keys and values of `length` positions from `start`:
    [2, layers, B, length, kv_heads, head_dim]."""
    return jnp.stack([jax.lax.dynamic_slice_in_dim(c, start, length, axis=2) for c in cache])


def drift(fresh: jax.Array, reference: jax.Array, masked: jax.Array) -> jax.Array:
    """How far the keys/values of masked positions moved: 1 - cosine similarity of each
    position's fresh and reference key (and value) over its heads, averaged over the masked
    positions of a row, the largest over layers, rows, keys and values. fresh, reference
    [2, layers, B, n, kv_heads, head_dim]; masked [B, n] bool. 0 where nothing is masked."""
    f = fresh.astype(jnp.float32).reshape(*fresh.shape[:4], -1)
    r = reference.astype(jnp.float32).reshape(*reference.shape[:4], -1)
    cos = jnp.sum(f * r, -1) / jnp.maximum(
        jnp.linalg.norm(f, axis=-1) * jnp.linalg.norm(r, axis=-1), 1e-12)
    m = masked.astype(jnp.float32)
    per_row = jnp.sum((1.0 - cos) * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
    return jnp.max(per_row)
