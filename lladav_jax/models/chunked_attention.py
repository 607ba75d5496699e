"""Blockwise attention in plain JAX (`attention_impl="chunked"`): flash attention's algorithm
without a kernel, for backends with no fused attention (the CPU; GPUs without cuDNN's).

The forward pass walks key blocks with an online softmax (a running maximum and normaliser per
query), one query block at a time, so no more than a [B, H, block_q, block_k] tile of scores
exists at once; it keeps only the output and each query's log-sum-exp. Its own backward pass
(`jax.custom_vjp`) recomputes each tile's probabilities from those instead of storing them.
Memory per layer and row is O(L * D + block_q * block_k * H) instead of XLA's O(H * L^2).

Masking is `masks.segment_mask` (and `conversation_mask` with turn ids) built tile by tile:
padding keys (segment 0) are never seen; a query that sees no key (a padding query) returns
zeros. Logits, softmax and accumulators are float32 whatever the input dtype.

Shapes: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] with H a multiple of Hkv (grouped queries share
their key head without copying it); ids [B, L] ints.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lladav_jax.models.masks import conversation_mask

BLOCK_Q = 512
BLOCK_K = 512
_NEG = -1e30  # a masked logit: finite, so that a row with nothing visible is not NaN


def chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None, q_turn_ids: jax.Array | None = None,
    kv_turn_ids: jax.Array | None = None, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> jax.Array:
    """`attention.attention` by blocks: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> [B, Lq, H, D].
    Segment ids None: every key visible; turn ids None: no conversation mask."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads do not group over {hkv} key/value heads")
    bq, bk = min(block_q, lq), min(block_k, lk)
    pad_q, pad_k = -lq % bq, -lk % bk
    ones = lambda n: jnp.ones((b, n), jnp.int32)
    qs = ones(lq) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    ks = ones(lk) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    qt = jnp.zeros((b, lq), jnp.int32) if q_turn_ids is None else q_turn_ids.astype(jnp.int32)
    kt = jnp.zeros((b, lk), jnp.int32) if kv_turn_ids is None else kv_turn_ids.astype(jnp.int32)
    # Block padding: queries of segment 0 (cut off below), keys of segment 0 (never seen).
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n)) + ((0, 0),) * (x.ndim - 2))
    q, qs, qt = pad(q, pad_q), pad(qs, pad_q), pad(qt, pad_q)
    k, v, ks, kt = pad(k, pad_k), pad(v, pad_k), pad(ks, pad_k), pad(kt, pad_k)
    # [B, L, H, D] -> [blocks, B, Hkv, G, block, D]; keys [blocks, B, Hkv, block, D].
    g = h // hkv
    qb = q.reshape(b, -1, bq, hkv, g, d).transpose(1, 0, 3, 4, 2, 5)
    kb = k.reshape(b, -1, bk, hkv, d).transpose(1, 0, 3, 2, 4)
    vb = v.reshape(b, -1, bk, hkv, d).transpose(1, 0, 3, 2, 4)
    ids = tuple(x.reshape(b, -1, n).transpose(1, 0, 2)
                for x, n in ((qs, bq), (qt, bq), (ks, bk), (kt, bk)))
    out = _attend(qb, kb, vb, *ids)  # [blocks, B, Hkv, G, block_q, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, -1, h, d)
    return out[:, :lq]


def _tile_mask(qs: jax.Array, qt: jax.Array, ks: jax.Array, kt: jax.Array) -> jax.Array:
    """[B, 1, 1, bq, bk]: `conversation_mask` of a tile (turns all 0 without a conversation
    mask: then it is `segment_mask`)."""
    return conversation_mask(qs, ks, qt, kt)[:, :, None]


def _scaled(qb: jax.Array) -> jax.Array:
    """Queries times 1/sqrt(D): the logits' scale applied once per query, not per tile."""
    return qb * jnp.asarray(1.0 / math.sqrt(qb.shape[-1]), qb.dtype)


def _logits(qb: jax.Array, kb: jax.Array, mask: jax.Array) -> jax.Array:
    """A tile's masked float32 logits [B, Hkv, G, bq, bk] of scaled queries (`_scaled`)."""
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qb, kb, preferred_element_type=jnp.float32)
    return jnp.where(mask, s, _NEG)


def _finite(m: jax.Array) -> jax.Array:
    """A row maximum (or log-sum-exp) to subtract before exp: itself, or 0 for a row that has
    seen nothing (_NEG), so that exp(_NEG - it) is 0 and masked logits need no second mask."""
    return jnp.where(m > _NEG / 2, m, 0.0)


def _forward_block(qb, qs, qt, kb, vb, ks, kt):
    """One query block against every key block: (output [B, Hkv, G, bq, D] float32, log-sum-exp
    [B, Hkv, G, bq]; a row that sees nothing has output 0 and log-sum-exp _NEG)."""
    shape = qb.shape[:-1]
    qb = _scaled(qb)

    def step(carry, key_block):
        m, norm, o = carry
        kj, vj, ksj, ktj = key_block
        s = _logits(qb, kj, _tile_mask(qs, qt, ksj, ktj))
        m_new = jnp.maximum(m, s.max(-1))
        shift = _finite(m_new)
        p = jnp.exp(s - shift[..., None])
        fade = jnp.exp(m - shift)
        o = o * fade[..., None] + jnp.einsum("bhgqk,bhkd->bhgqd", p, vj.astype(jnp.float32))
        return (m_new, norm * fade + p.sum(-1), o), None

    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(qb.shape, jnp.float32))
    (m, norm, o), _ = jax.lax.scan(step, init, (kb, vb, ks, kt))
    seen = norm > 0
    norm = jnp.where(seen, norm, 1.0)
    out = jnp.where(seen[..., None], o / norm[..., None], 0.0)
    return out, jnp.where(seen, m + jnp.log(norm), _NEG)


@jax.custom_vjp
def _attend(qb, kb, vb, qs, qt, ks, kt):
    return _forward(qb, kb, vb, qs, qt, ks, kt)[0]


def _forward(qb, kb, vb, qs, qt, ks, kt):
    block = functools.partial(_forward_block, kb=kb, vb=vb, ks=ks, kt=kt)
    out, lse = jax.lax.map(lambda xs: block(*xs), (qb, qs, qt))
    return out.astype(qb.dtype), lse


def _attend_fwd(qb, kb, vb, qs, qt, ks, kt):
    out, lse = _forward(qb, kb, vb, qs, qt, ks, kt)
    return out, (qb, kb, vb, qs, qt, ks, kt, out, lse)


def _attend_bwd(res, d_out):
    """Flash attention's backward: per tile, p = exp(s - lse) recomputed; dS = p (dP - delta)
    with delta = rowsum(dO * O). Query blocks in the outer loop carry dK, dV; key blocks in the
    inner loop carry the query block's dQ."""
    qb, kb, vb, qs, qt, ks, kt, out, lse = res
    scale = 1.0 / math.sqrt(qb.shape[-1])
    f32 = lambda x: x.astype(jnp.float32)
    delta = jnp.sum(f32(d_out) * f32(out), -1)  # [nq, B, Hkv, G, bq]

    def query_block(dkv, xs):
        qi, qsi, qti, doi, lsei, di = xs
        q_scaled, lse_finite = _scaled(qi), _finite(lsei)[..., None]

        def key_block(dq, ys):
            kj, vj, ksj, ktj = ys
            p = jnp.exp(_logits(q_scaled, kj, _tile_mask(qsi, qti, ksj, ktj)) - lse_finite)
            dv = jnp.einsum("bhgqk,bhgqd->bhkd", p, f32(doi))
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", f32(doi), f32(vj))
            ds = p * (dp - di[..., None]) * scale
            dq = dq + jnp.einsum("bhgqk,bhkd->bhgqd", ds, f32(kj))
            dk = jnp.einsum("bhgqk,bhgqd->bhkd", ds, f32(qi))
            return dq, (dk, dv)

        dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qi.shape, jnp.float32),
                                    (kb, vb, ks, kt))
        return (dkv[0] + dk, dkv[1] + dv), dq

    zeros = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(query_block, zeros, (qb, qs, qt, d_out, lse, delta))
    return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype),
            None, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)

__all__ = ["BLOCK_K", "BLOCK_Q", "chunked_attention"]
