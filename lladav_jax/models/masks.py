"""Attention masks from ids, one rule for every implementation (`attention.py` builds whole
masks with them, `chunked_attention.py` one tile at a time): segment ids [B, L] (0 = padding;
tokens see only their own segment) and, for LLaDA-V's dialogue-causal mask, turn ids [B, L]
(0 first; earlier turns visible, bidirectional within a turn)."""

from __future__ import annotations

import jax


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """[B, 1, Lq, Lk] boolean: same segment and the key is not padding."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (same & (kv_segment_ids[:, None, :] != 0))[:, None]


def conversation_mask(
    q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_turn_ids: jax.Array,
    kv_turn_ids: jax.Array,
) -> jax.Array:
    """[B, 1, Lq, Lk] boolean: `segment_mask` and the key's turn is not after the query's
    (earlier turns visible, bidirectional within a turn). Turn ids [B, L] ints, 0 first."""
    earlier = kv_turn_ids[:, None, :] <= q_turn_ids[:, :, None]
    return segment_mask(q_segment_ids, kv_segment_ids) & earlier[:, None]


__all__ = ["conversation_mask", "segment_mask"]
