"""The one attention function of the project, with an implementation switch.

Attention is bidirectional everywhere (LLaDA has no causal mask; SigLIP never had one). The only
mask is built from segment ids: 0 marks padding, and tokens attend only within their own
segment, which keeps packed samples apart.
"""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("xla", "cudnn")


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """[B, 1, Lq, Lk] boolean: same segment and the key is not padding."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (same & (kv_segment_ids[:, None, :] != 0))[:, None]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (H a multiple of Hkv) -> [B, Lq, H, D].

    Segment ids are [B, L] ints (0 = padding); `None` means every key is visible.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose one of {IMPLEMENTATIONS}")
    mask = None
    if q_segment_ids is not None:
        kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = segment_mask(q_segment_ids, kv_segment_ids)
    # jax computes the logits and softmax in float32 for bf16 inputs.
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)

