"""The one attention function of the project, with an implementation switch.

Attention is bidirectional by default (LLaDA has no causal mask; SigLIP never had one). The
mask is built from segment ids: 0 marks padding, and tokens attend only within their own
segment, which keeps packed samples apart. Rows of padding queries are unspecified (finite, but
implementation-dependent): nothing may read them.

Masks (`attention_mask` in the model config, ATTENTION_MASKS): "bidirectional", or
"conversation", LLaDA-V's dialogue-causal mask: with turn ids (0 first) a query also sees only
keys of its own or earlier turns (`conversation_mask`).

Implementations (`attention_impl` in the model config):
- "xla": `jax.nn.dot_product_attention`, any backend.
- "cudnn": the same function with cuDNN flash attention (NVIDIA GPU, bfloat16/float16).
- "splash": the Pallas Splash attention kernel (TPU).
- "chunked": blockwise attention in plain JAX with its own backward (`chunked_attention.py`):
  no [heads, Lq, Lk] scores held, any backend.
- "auto": splash on TPU, cudnn on GPU where it applies, chunked otherwise, silently.
An explicit "cudnn" or "splash" the hardware cannot run falls back to xla with a warning, logged
once per (implementation, reason).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike

from lladav_jax.models.chunked_attention import chunked_attention
from lladav_jax.models.masks import conversation_mask, segment_mask
from lladav_jax.scale import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "chunked", "auto")
ATTENTION_MASKS = ("bidirectional", "conversation")
DEFAULT_MAX_TURNS = 32  # `ModelConfig.max_turns`: splash runs one pass per possible turn

log = logging.getLogger(__name__)

# Tests only: run splash's Pallas kernel in interpret mode, so that it runs (slowly) anywhere.
SPLASH_INTERPRET = False

_warned: set[tuple[str, str]] = set()

_LANES = 128  # splash needs q and kv blocks that are multiples of this


def splash_unsupported(backend: str) -> str | None:
    """Why splash cannot run on `backend`, or None if it can."""
    if backend == "tpu" or SPLASH_INTERPRET:
        return None
    return f"Splash attention is a TPU kernel and the backend is {backend!r}"


def cudnn_unsupported(
    backend: str,
    dtype: DTypeLike,
    head_dim: int,
    q_len: int,
    kv_len: int,
    *,
    masked: bool,
    max_head_dim: int | None = None,
) -> str | None:
    """Why cuDNN flash attention (as `jax.nn.dot_product_attention` checks it) cannot take this
    call, or None if it can. `max_head_dim` defaults to the GPU's: 256 from Hopper on, else 128."""
    if backend != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU and the backend is {backend!r}"
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention takes bfloat16/float16, not {dtype}"
    if max_head_dim is None:
        max_head_dim = _cudnn_max_head_dim()
    if head_dim % 8 or head_dim > max_head_dim:
        return f"cuDNN needs a head_dim that is a multiple of 8, <= {max_head_dim}; not {head_dim}"
    # The mask becomes a bias, whose backward pass cuDNN runs only for even lengths.
    if masked and (q_len % 2 or kv_len % 2):
        return f"cuDNN with a mask needs even sequence lengths, not {q_len} x {kv_len}"
    return None


def _cudnn_max_head_dim() -> int:
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return 256 if tuple(int(c) for c in capability.split(".")[:2]) >= (9, 0) else 128


def resolve_impl(
    impl: str,
    *,
    dtype: DTypeLike,
    head_dim: int,
    q_len: int,
    kv_len: int,
    masked: bool,
    backend: str | None = None,
) -> str:
    """The implementation that runs: `impl` itself, "auto"'s pick, or "xla" (with a one-time
    warning) where the hardware or the call does not suit `impl`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose one of {IMPLEMENTATIONS}")
    backend = backend or jax.default_backend()
    cudnn = functools.partial(
        cudnn_unsupported, backend, dtype, head_dim, q_len, kv_len, masked=masked
    )
    if impl == "auto":
        if backend == "tpu":
            return "splash"
        return "cudnn" if cudnn() is None else "chunked"
    if impl == "splash":
        reason = splash_unsupported(backend)
    elif impl == "cudnn":
        reason = cudnn()
    else:  # xla, chunked: any backend
        return impl
    if reason is None:
        return impl
    if (impl, reason) not in _warned:
        _warned.add((impl, reason))
        log.warning(
            "attention_impl=%r is unavailable: %s; falling back to 'xla' (set attention_impl to "
            "'xla', or to 'auto' for splash on TPU and cudnn on GPU, to silence this)",
            impl,
            reason,
        )
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_turn_ids: jax.Array | None = None,
    kv_turn_ids: jax.Array | None = None,
    max_turns: int = DEFAULT_MAX_TURNS,
    impl: str = "xla",
) -> jax.Array:
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (H a multiple of Hkv) -> [B, Lq, H, D].

    Segment ids are [B, L] ints (0 = padding); `None` means every key is visible.
    Turn ids [B, L] ints (0 first; `None`: bidirectional) add the conversation mask
    (`conversation_mask`). Turn ids must be < `max_turns`, the bound of splash's passes; the
    data pipeline and the inference API guarantee it (they skip or refuse longer dialogues).
    """
    if q_segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    turns = q_turn_ids is not None
    if turns:
        kv_turn_ids = q_turn_ids if kv_turn_ids is None else kv_turn_ids
        if q_segment_ids is None:  # one segment, no padding
            q_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
            kv_segment_ids = jnp.ones(k.shape[:2], jnp.int32)
    impl = resolve_impl(
        impl,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        q_len=q.shape[1],
        kv_len=k.shape[1],
        masked=q_segment_ids is not None,
    )
    if impl == "splash":
        if turns:
            return splash_attention(q, k, v, q_segment_ids, kv_segment_ids,
                                    (q_turn_ids, kv_turn_ids), max_turns)
        return splash_attention(q, k, v, q_segment_ids, kv_segment_ids)
    if impl == "chunked":
        return chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, q_turn_ids,
                                 kv_turn_ids)
    mask = None
    if turns:
        mask = conversation_mask(q_segment_ids, kv_segment_ids, q_turn_ids, kv_turn_ids)
    elif q_segment_ids is not None:
        mask = segment_mask(q_segment_ids, kv_segment_ids)
    # jax computes the logits and softmax in float32 for bf16 inputs.
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    turn_ids: tuple[jax.Array, jax.Array] | None = None,
    max_turns: int = DEFAULT_MAX_TURNS,
) -> jax.Array:
    """`attention` by the Splash kernel; under a mesh with logical rules (sharding.
    sharding_context) it runs per shard of batch and heads, the sequence whole.
    `turn_ids`: (q [B, Lq], kv [B, Lk]) for the conversation mask (`_splash_turns`)."""
    b, lq, h, _ = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if q_segment_ids is None:  # one segment; the kernel's block padding below is segment 0
        q_segment_ids = jnp.ones((b, lq), jnp.int32)
        kv_segment_ids = jnp.ones((b, lk), jnp.int32)
    ids = (q_segment_ids, kv_segment_ids)
    if turn_ids is None:
        fn = _splash
    else:
        fn, ids = functools.partial(_splash_turns, max_turns=max_turns), ids + tuple(turn_ids)
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh is None or mesh.empty or not rules or mesh.manual_axes:
        return fn(q, k, v, *ids)
    batch = _mesh_axes("batch", rules, mesh, b)
    heads = _mesh_axes("act_heads", rules, mesh, h)
    if heads is not None and hkv % sharding.axes_size(mesh, heads):
        # Too few kv heads to split: give every q head its own copy, which keeps the grouping.
        k, v = jnp.repeat(k, h // hkv, axis=2), jnp.repeat(v, h // hkv, axis=2)
    qkv, id_spec = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv) + (id_spec,) * len(ids),  # turn ids sharded like segments
        out_specs=qkv,
        check_vma=False,  # a Pallas call does not declare how its output varies over the mesh
    )(q, k, v, *ids)


# Segment ids that match nothing in `_splash_turns`: real segments are >= 1, padding 0.
_OTHER_TURN_QUERY, _LATER_TURN_KEY = -1, -2


def _splash_turns(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array, q_turn_ids: jax.Array, kv_turn_ids: jax.Array, *, max_turns: int,
) -> jax.Array:
    """One device's splash attention under the conversation mask. The kernel's mask is static,
    so the data-dependent one is made of segment ids, one pass per turn t: queries of turn t
    keep their segment (others a sentinel no key has), keys of turns <= t theirs (later ones
    another sentinel); the rows of turn-t queries come from pass t. Passes past the largest
    query turn are skipped (`lax.cond`): only the turns present cost time."""
    last = jnp.max(q_turn_ids)
    q_seg, kv_seg = q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)

    def run(t: jax.Array, out: jax.Array) -> jax.Array:
        mine = q_turn_ids == t
        qs = jnp.where(mine, q_seg, _OTHER_TURN_QUERY)
        ks = jnp.where(kv_turn_ids <= t, kv_seg, _LATER_TURN_KEY)
        return jnp.where(mine[:, :, None, None], _splash(q, k, v, qs, ks), out)

    def body(t: jax.Array, out: jax.Array) -> jax.Array:
        return jax.lax.cond(t <= last, run, lambda _t, o: o, t, out)

    # A static trip count: a scan, which reverse-mode differentiation can take.
    return jax.lax.fori_loop(0, max_turns, body, jnp.zeros_like(q))


def _mesh_axes(name: str, rules, mesh, dim: int) -> str | tuple[str, ...] | None:
    """The mesh axes the rules give logical axis `name`, if they split `dim` evenly."""
    (axes,) = spmd.from_sharding_rules((name,), rules)
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if not names or not set(names) <= set(mesh.axis_names) or dim % sharding.axes_size(mesh, names):
        return None
    return axes


def _splash(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array
) -> jax.Array:
    """One device's splash attention; shapes as `attention`, segment ids given."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    lq, d = q.shape[1], q.shape[-1]
    pad_q, pad_k = -lq % _LANES, -k.shape[1] % _LANES

    def heads_major(x: jax.Array, pad: int) -> jax.Array:  # [B, L, H, D] -> [B, H, L + pad, D]
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))

    # The kernel does not scale the logits.
    q = heads_major(q * (1.0 / math.sqrt(d)), pad_q)
    k, v = heads_major(k, pad_k), heads_major(v, pad_k)
    # Block padding is segment 0, which real queries (segments >= 1) never see. Queries of
    # segment 0 see only segment-0 keys, or with none a uniform average (the kernel masks with a
    # finite value, so never NaN); their rows are cut off or unspecified.
    segments = sk.SegmentIds(
        q=jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, pad_q))),
        kv=jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pad_k))),
    )
    kernel = _splash_kernel(q.shape[1], q.shape[2], k.shape[2], SPLASH_INTERPRET)
    out = jax.vmap(kernel)(q, k, v, segments)
    return out[:, :, :lq].transpose(0, 2, 1, 3)


def _block(n: int) -> int:
    """The largest of 512/256/128 that divides `n` (a multiple of 128)."""
    return next(b for b in (512, 256, _LANES) if n % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    """A bidirectional (full-mask) Splash kernel; GQA follows from the shapes of q and k."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq, bkv = _block(q_len), _block(kv_len)
    sizes = sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len))] * heads)
    # Concrete mask metadata even when first built inside a trace: the cache outlives traces.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )
