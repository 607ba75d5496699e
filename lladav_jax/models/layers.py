"""Building blocks shared by the vision tower and the language model.

Every parameter carries logical axis names (`out_sharding` metadata); `lladav_jax.scale.sharding`
maps them onto mesh axes. Without a mesh the names are inert.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

from lladav_jax.models.dense import NONE, Adapt, Dense, axes

Axes = tuple[str | None, ...]


_FLOAT32 = jnp.dtype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """What every layer needs: `dtype` computes (activations, matmuls), `param_dtype` stores,
    `init` draws the linear layers' kernels (`INITS`). `ModelConfig.numerics` builds it."""

    dtype: jnp.dtype = _FLOAT32
    param_dtype: jnp.dtype = _FLOAT32
    init: str = "official"


# Kernel initialisations of the linear layers: `official`, N(0, 0.02) everywhere (the released
# configs' initializer_range); `fan_in`, N(0, 1 / d_in), for small models trained from scratch:
# at width 64, 0.02 leaves every attention near uniform and every branch near zero, and the demo
# sat at chance for ~1,500 steps (docs/design.md §4.5).
INITS = ("official", "fan_in")


def linear(
    d_in: int,
    d_out: int,
    names: Axes,
    numerics: Numerics,
    rngs: nnx.Rngs,
    *,
    use_bias: bool = False,
    std: float = 0.02,
    adapt: Adapt = NONE,
) -> Dense:
    """A dense layer with logical axes on its kernel [in, out] (and bias [out]); `adapt`
    gives it a LoRA adapter and/or quantized weights (`dense`). `std`: the `official` init's."""
    if numerics.init == "fan_in":
        std = d_in ** -0.5
    return Dense(d_in, d_out, names, numerics.dtype, numerics.param_dtype, rngs,
                 use_bias=use_bias, std=std, adapt=adapt)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: normalise in float32, cast back, then scale (the HF order of operations)."""

    def __init__(self, dim: int, eps: float, numerics: Numerics, axis: str = "norm"):
        self.eps = eps
        self.dtype = numerics.dtype
        self.weight = nnx.Param(jnp.ones((dim,), numerics.param_dtype), **axes(axis))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


def layer_norm(
    dim: int, eps: float, numerics: Numerics, rngs: nnx.Rngs, axis: str = "norm"
) -> nnx.LayerNorm:
    """LayerNorm (scale and bias) over the last axis, statistics in float32 (flax)."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=numerics.dtype,
        param_dtype=numerics.param_dtype,
        scale_metadata=axes(axis),
        bias_metadata=axes(axis),
        rngs=rngs,
    )


def constrain(x: jax.Array, names: Axes) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh is None or mesh.empty or not rules:
        return x
    spec = PartitionSpec(*spmd.from_sharding_rules(names, rules))
    return jax.lax.with_sharding_constraint(x, spec)


_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}
REMAT_POLICIES = ("none", *_POLICIES)


def remat(fn: Callable, policy: str) -> Callable:
    """Wraps a layer function in activation checkpointing by policy name (`none` = off)."""
    if policy == "none":
        return fn
    if policy not in _POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r}; choose none or {list(_POLICIES)}")
    return jax.checkpoint(fn, policy=_POLICIES[policy], prevent_cse=False)


def scan_layers(
    make_layer: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs
) -> nnx.Module:
    """Creates `n` layers with stacked parameters (leading `layers` axis) for `run_layers`."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return make_layer(r)

    return make(rngs)


def run_layers(layers: nnx.Module, x: jax.Array, policy: str, rng: jax.Array | None = None,
               **kwargs) -> jax.Array:
    """Runs stacked layers over `x` with `lax.scan`: compile time does not grow with depth.
    `rng` (adapter dropout in training) is split into one key per layer, passed as `rng=`."""
    graphdef, state = nnx.split(layers)
    n = jax.tree.leaves(state)[0].shape[0]
    keys = None if rng is None else jax.random.split(rng, n)

    def body(h, xs):
        layer_state, key = xs
        extra = {} if key is None else {"rng": key}
        return nnx.merge(graphdef, layer_state)(h, **extra, **kwargs), None

    x, _ = jax.lax.scan(remat(body, policy), x, (state, keys))
    return x


def run_layers_with_cache(
    layers: nnx.Module, x: jax.Array, cache: tuple[jax.Array, jax.Array], **kwargs
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Like `run_layers` for inference, threading each layer's K/V cache through the scan:
    cache is (K, V) stacked over layers; returns (x, updated cache)."""
    graphdef, state = nnx.split(layers)

    def body(h, xs):
        layer_state, layer_cache = xs
        h, new_cache = nnx.merge(graphdef, layer_state)(h, cache=layer_cache, **kwargs)
        return h, new_cache

    return jax.lax.scan(body, x, (state, cache))
