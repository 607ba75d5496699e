"""The attention switch: xla against plain numpy, splash (Pallas interpret mode on the CPU)
against xla, the fallback warnings, and the tiny model with splash."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lladav_jax.models import attention as attn
from lladav_jax.models import variants
from lladav_jax.models.llada import LLaDA
from lladav_jax.models.siglip import SigLIPVision
from lladav_jax.scale import sharding


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(attn, "SPLASH_INTERPRET", True)


@pytest.fixture
def warnings(monkeypatch, caplog):
    monkeypatch.setattr(attn, "_warned", set())
    caplog.set_level(logging.WARNING, logger=attn.__name__)
    return lambda: [r.getMessage() for r in caplog.records if r.name == attn.__name__]


def packed_segments(b: int, n: int, seed: int) -> np.ndarray:
    """[b, n]: row 0 two samples then padding, the others three samples filling the row."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, n), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, n - 1), 2, replace=False))
        ids[i, : cuts[0]], ids[i, cuts[0] : cuts[1]] = 1, 2
        ids[i, cuts[1] :] = 0 if i == 0 else 3
    assert (ids[0] == 0).any() and (ids[1:] > 0).all()
    return ids


def qkv(b: int, lq: int, lk: int, h: int, hkv: int, d: int, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(b, lq, h, d)).astype(dtype),
        rng.normal(size=(b, lk, hkv, d)).astype(dtype),
        rng.normal(size=(b, lk, hkv, d)).astype(dtype),
    )


def numpy_attention(q, k, v, q_seg, kv_seg) -> np.ndarray:
    """Softmax attention in float64; rows of padding queries are NaN (nothing visible)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    visible = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    logits = np.where(visible[:, None], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def run(impl: str, q, k, v, q_seg=None, kv_seg=None) -> np.ndarray:
    f = jax.jit(
        lambda q, k, v, s, t: attn.attention(q, k, v, q_segment_ids=s, kv_segment_ids=t, impl=impl)
    )
    return np.asarray(f(q, k, v, q_seg, kv_seg))


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_xla_matches_numpy_with_packing_padding_and_gqa(hkv):
    q, k, v = qkv(3, 37, 37, 4, hkv, 16)
    seg = packed_segments(3, 37, seed=hkv)
    got, want = run("xla", q, k, v, seg), numpy_attention(q, k, v, seg, seg)
    real = seg > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
    # A chunk of queries against the whole sequence (the sampler's cached path).
    got = run("xla", q[:, 10:20], k, v, seg[:, 10:20], seg)
    want = numpy_attention(q[:, 10:20], k, v, seg[:, 10:20], seg)
    np.testing.assert_allclose(got[real[:, 10:20]], want[real[:, 10:20]], atol=1e-5, rtol=0)
    # No segment ids: every key visible.
    ones = np.ones_like(seg)
    np.testing.assert_allclose(
        run("xla", q, k, v), numpy_attention(q, k, v, ones, ones), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(("length", "hkv"), [(256, 2), (200, 4), (200, 1)])
def test_splash_interpret_matches_xla(interpret, warnings, length, hkv):
    q, k, v = qkv(2, length, length, 4, hkv, 64, seed=length)
    seg = packed_segments(2, length, seed=hkv)
    real = seg > 0
    got, want = run("splash", q, k, v, seg), run("xla", q, k, v, seg)
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
    assert np.isfinite(got).all()  # padding rows too
    jaxpr = jax.make_jaxpr(lambda q: attn.attention(q, k, v, q_segment_ids=seg, impl="splash"))
    assert "pallas_call" in str(jaxpr(q))
    # Without segment ids; a length that is not a multiple of the block needs block padding.
    np.testing.assert_allclose(run("splash", q, k, v), run("xla", q, k, v), atol=1e-5, rtol=0)
    # A chunk of queries against the whole sequence.
    got = run("splash", q[:, 64:96], k, v, seg[:, 64:96], seg)
    want = run("xla", q[:, 64:96], k, v, seg[:, 64:96], seg)
    np.testing.assert_allclose(got[real[:, 64:96]], want[real[:, 64:96]], atol=1e-5, rtol=0)
    assert warnings() == []


def test_splash_interpret_gradients_match_xla(interpret, warnings):
    q, k, v = qkv(2, 200, 200, 4, 2, 64, seed=5)
    seg = packed_segments(2, 200, seed=5)
    # Output weights zero on padding rows, whose values are unspecified.
    w = np.random.default_rng(6).normal(size=q.shape).astype(np.float32)
    w *= (seg > 0)[..., None, None]

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(attn.attention(q, k, v, q_segment_ids=seg, impl=impl) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads("splash"), grads("xla"), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    assert warnings() == []


# 3 kv heads do not split over tensor=2: each q head then gets its own copy of its kv head.
@pytest.mark.parametrize(("h", "hkv"), [(4, 2), (6, 3)])
def test_splash_under_a_mesh_runs_per_shard(interpret, h, hkv):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    q, k, v = qkv(4, 136, 136, h, hkv, 64, seed=7)
    seg = np.concatenate([packed_segments(2, 136, seed=8)] * 2)
    want = run("xla", q, k, v, seg)
    f = lambda q, k, v: attn.attention(q, k, v, q_segment_ids=seg, impl="splash")
    with sharding.sharding_context(mesh):
        got = np.asarray(jax.jit(f)(q, k, v))
        jaxpr = str(jax.make_jaxpr(f)(q, k, v))
    assert "shard_map" in jaxpr and "tensor" in jaxpr
    real = seg > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_unavailable_impl_falls_back_to_xla_once_with_a_warning(warnings, impl):
    assert jax.default_backend() == "cpu"
    q, k, v = qkv(2, 24, 24, 4, 2, 16)
    seg = packed_segments(2, 24, seed=0)
    np.testing.assert_array_equal(run(impl, q, k, v, seg), run("xla", q, k, v, seg))
    run(impl, q[:, :8], k, v, seg[:, :8], seg)  # a second trace: no second warning
    (message,) = warnings()
    assert f"attention_impl={impl!r}" in message and "'cpu'" in message
    assert "falling back to 'xla'" in message


def test_cudnn_conditions_and_one_warning_per_reason(warnings):
    ok = dict(head_dim=128, q_len=64, kv_len=64, masked=True, max_head_dim=128)
    assert attn.cudnn_unsupported("gpu", jnp.bfloat16, **ok) is None
    assert attn.cudnn_unsupported("gpu", jnp.float16, **ok) is None
    assert "float32" in attn.cudnn_unsupported("gpu", jnp.float32, **ok)
    assert "tpu" in attn.cudnn_unsupported("tpu", jnp.bfloat16, **ok)
    for head_dim in (12, 256):
        assert str(head_dim) in attn.cudnn_unsupported(
            "gpu", jnp.bfloat16, **(ok | dict(head_dim=head_dim))
        )
    odd = ok | dict(q_len=63)
    assert "even" in attn.cudnn_unsupported("gpu", jnp.bfloat16, **odd)
    assert attn.cudnn_unsupported("gpu", jnp.bfloat16, **(odd | dict(masked=False))) is None

    call = dict(head_dim=64, q_len=64, kv_len=64, masked=True)
    for dtype in (jnp.float32, jnp.float32, jnp.float64):
        assert attn.resolve_impl("cudnn", dtype=dtype, backend="gpu", **call) == "xla"
    assert len(warnings()) == 2  # float32 once, float64 once
    assert attn.resolve_impl("cudnn", dtype=jnp.bfloat16, backend="gpu", **call) == "cudnn"
    assert attn.resolve_impl("splash", dtype=jnp.float32, backend="tpu", **call) == "splash"


def test_auto_picks_by_backend_silently(warnings):
    call = dict(head_dim=64, q_len=64, kv_len=64, masked=True)
    assert attn.resolve_impl("auto", dtype=jnp.float32, backend="tpu", **call) == "splash"
    assert attn.resolve_impl("auto", dtype=jnp.bfloat16, backend="gpu", **call) == "cudnn"
    assert attn.resolve_impl("auto", dtype=jnp.float32, backend="gpu", **call) == "chunked"
    assert attn.resolve_impl("auto", dtype=jnp.bfloat16, backend="cpu", **call) == "chunked"
    assert attn.resolve_impl("chunked", dtype=jnp.float32, backend="tpu", **call) == "chunked"
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        attn.resolve_impl("flash", dtype=jnp.float32, **call)
    assert warnings() == []


def tiny_cfg(impl: str):
    cfg = variants.model_config("tiny")
    cfg.text.num_kv_heads = 2
    cfg.attention_impl = impl
    return cfg


def tiny_logits(*impls: str) -> tuple:
    """The tiny LLaDA's logits under each implementation (same weights) on two rows of packed
    samples, and the rows' segment ids."""
    tokens = np.random.default_rng(3).integers(0, 512, (2, 40))
    seg = packed_segments(2, 40, seed=3)
    positions = np.zeros_like(seg)
    for i in range(2):
        for s in (1, 2, 3):
            positions[i, seg[i] == s] = np.arange((seg[i] == s).sum())
    forward = nnx.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s))
    return (*(np.asarray(forward(LLaDA(tiny_cfg(impl), rngs=nnx.Rngs(0)), tokens, positions, seg))
              for impl in impls), seg)


@pytest.mark.slow
def test_tiny_model_same_logits_with_splash(interpret, warnings):
    """head_dim 16 (text) and 16 (vision): below a TPU lane, fine for the kernel's interpret
    mode; L=40 and 16 patches are padded to one 128 block."""
    want, got, seg = tiny_logits("xla", "splash")
    real = seg > 0
    np.testing.assert_allclose(
        got[real], want[real], atol=1e-5 * max(1, np.abs(want).max()), rtol=0
    )

    pixels = np.random.default_rng(4).uniform(-1, 1, (3, 56, 56, 3)).astype(np.float32)
    xla, splash = (SigLIPVision(tiny_cfg(impl), rngs=nnx.Rngs(0)) for impl in ("xla", "splash"))
    vision = nnx.jit(lambda m, x: m(x))
    want = np.asarray(vision(xla, pixels))
    np.testing.assert_allclose(
        np.asarray(vision(splash, pixels)), want, atol=1e-5 * max(1, np.abs(want).max()), rtol=0
    )
    assert warnings() == []
