"""Blockwise attention (`attention_impl="chunked"`) against xla: values and gradients in
float32 with padding, packed segments, grouped queries, query chunks against a whole sequence
and lengths that are not multiples of the blocks; bfloat16 inputs; the tiny model's logits;
and the memory it saves at length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lladav_jax.models import attention as attn
from lladav_jax.models.chunked_attention import chunked_attention
from tests.models.test_attention import packed_segments, qkv, tiny_logits


def xla(q, k, v, seg, kv_seg=None):
    return attn.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=kv_seg, impl="xla")


def scale_of(x) -> float:
    return max(1.0, float(np.abs(np.asarray(x)).max()))


@pytest.mark.parametrize(("length", "h", "hkv", "block"),
                         [(200, 4, 4, 64), (200, 4, 2, 48), (97, 8, 2, 32), (64, 2, 1, 512)])
def test_values_and_gradients_equal_xla(length, h, hkv, block):
    """Padding and three packed samples; blocks that do not divide the length (padded)."""
    q, k, v = qkv(3, length, length, h, hkv, 16, seed=length + h)
    seg = packed_segments(3, length, seed=hkv)
    real = (seg > 0)[..., None, None]
    w = np.random.default_rng(1).normal(size=q.shape).astype(np.float32) * real

    def chunked(q, k, v):
        return chunked_attention(q, k, v, seg, seg, block_q=block, block_k=block)

    want, got = xla(q, k, v, seg), jax.jit(chunked)(q, k, v)
    np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, atol=1e-6, rtol=0)
    assert np.isfinite(np.asarray(got)).all()
    assert (np.asarray(got)[seg == 0] == 0).all()  # a query that sees nothing returns zeros

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(
            q, k, v)

    for name, g, r in zip("qkv", grads(chunked), grads(lambda q, k, v: xla(q, k, v, seg)),
                          strict=True):
        r = np.asarray(r)
        np.testing.assert_allclose(np.asarray(g), r, atol=1e-6 * scale_of(r), rtol=0,
                                   err_msg=f"d{name}")


def test_a_query_chunk_against_the_whole_sequence():
    """The sampler's cached path: a block of queries, every key; and no segment ids at all."""
    q, k, v = qkv(2, 160, 160, 4, 2, 16, seed=3)
    seg = packed_segments(2, 160, seed=3)
    part = slice(40, 72)
    want = xla(q[:, part], k, v, seg[:, part], seg)
    got = chunked_attention(q[:, part], k, v, seg[:, part], seg, block_q=16, block_k=48)
    real = (seg[:, part] > 0)[..., None, None]
    np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, atol=1e-6, rtol=0)
    want = attn.attention(q[:, :9], k, v, impl="xla")
    got = attn.attention(q[:, :9], k, v, impl="chunked")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


def test_bfloat16_inputs_keep_their_dtype_and_float32_accumulation():
    q, k, v = qkv(2, 128, 128, 4, 2, 32, seed=4)
    seg = packed_segments(2, 128, seed=4)
    real = seg > 0
    want = np.asarray(xla(q, k, v, seg))  # float32 inputs
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    got = chunked_attention(*bf, seg, seg, block_q=32, block_k=32)
    assert got.dtype == jnp.bfloat16
    ref = np.asarray(xla(*bf, seg).astype(jnp.float32))
    err_chunked = np.abs(np.asarray(got.astype(jnp.float32)) - want)[real].max()
    err_xla = np.abs(ref - want)[real].max()
    assert err_chunked <= 2 * err_xla + 1e-3, (err_chunked, err_xla)


def test_tiny_model_same_logits_with_chunked():
    want, got, seg = tiny_logits("xla", "chunked")
    real = seg > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-5 * scale_of(want), rtol=0)


def temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_stays_linear_in_length():
    """At 4,096 tokens (4 heads), the forward and backward pass of xla hold [H, L, L] float32
    scores (256 MiB); chunked holds 512-wide tiles."""
    length, h = 4096, 4
    q, k, v = (jax.ShapeDtypeStruct((1, length, h, 16), jnp.float32) for _ in range(3))
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(impl):
        return jax.grad(lambda q, k, v, s: jnp.sum(attn.attention(
            q, k, v, q_segment_ids=s, impl=impl)), argnums=(0, 1, 2))

    scores = h * length * length * 4
    xla_bytes, chunked_bytes = temp_bytes(loss("xla"), q, k, v, seg), temp_bytes(
        loss("chunked"), q, k, v, seg)
    assert xla_bytes >= scores, xla_bytes
    assert chunked_bytes < scores / 8, (chunked_bytes, xla_bytes)
