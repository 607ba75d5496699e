"""Between the plain parameter layout and an adapted one (LoRA and/or quantized weights).

A model directory and the official release hold plain parameters (`kernel`, `embedding`). A
model whose config has `lora.rank > 0` or `quantize.weights` holds, per adapted layer,
`lora_a` / `lora_b` beside its `kernel`, and `qvalue` / `qscale` in place of a quantized one
(`lladav_jax.models.dense`). These functions map pure parameter dicts (`nnx.to_pure_dict`)
between the two; stacked layers keep their leading `layers` axis throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from lladav_jax.models import lladav, quant
from lladav_jax.models.config import ModelConfig, ModelConfigLike

Flat = dict[tuple[str, ...], jax.Array]


def _flat(params: Mapping) -> Flat:
    return traverse_util.flatten_dict(dict(params))


def fresh_adapters(cfg: ModelConfigLike, seed: int = 0, shardings: Mapping | None = None) -> dict:
    """New LoRA parameters of `cfg` (A random, B zero) as a pure dict, placed by `shardings`
    (a pure dict of them) if given; only they are computed (the rest of the model is dropped
    from the program)."""
    cfg = ModelConfig.from_config(cfg)
    make = lambda: nnx.to_pure_dict(nnx.state(lladav.LLaDAV(cfg, rngs=nnx.Rngs(seed)),
                                              nnx.LoRAParam))
    return jax.jit(make, out_shardings=shardings)()


def adapt(base: Mapping, cfg: ModelConfigLike, seed: int = 0,
          adapters: Mapping | None = None) -> dict:
    """Plain parameters -> those of the adapted `cfg`: kernels quantized where it quantizes,
    `adapters` (a pure dict of LoRA parameters; default: fresh ones) where it has LoRA."""
    cfg = ModelConfig.from_config(cfg)
    if adapters is None:
        adapters = fresh_adapters(cfg, seed) if cfg.lora.rank else {}
    have = _flat(base)

    def get(key):
        if key not in have:
            raise KeyError(f"no weight {'.'.join(key)} in the plain parameters")
        return have[key]

    return adapt_stream(get, cfg, adapters)


def adapt_stream(plain: Callable[[tuple[str, ...]], jax.Array | np.ndarray],
                 cfg: ModelConfigLike, adapters: Mapping,
                 shardings: Mapping | None = None) -> dict:
    """`adapt` with the plain weights fetched one at a time by `plain(key)` (a stored array,
    read when needed), each placed by `shardings` if given: the float model is never whole."""
    cfg = ModelConfig.from_config(cfg)
    want = _flat(lladav.abstract_params(cfg))
    lora, place = _flat(adapters), _flat(shardings) if shardings is not None else {}
    dtype = jnp.dtype(cfg.param_dtype)
    out: Flat = {}
    for key, target in want.items():
        parent, leaf = key[:-1], key[-1]
        if key in out:
            continue
        if leaf in ("lora_a", "lora_b"):
            if key not in lora:
                raise KeyError(f"no adapter weight {'.'.join(key)}")
            out[key] = lora[key]
        elif leaf in ("qvalue", "qscale"):
            embed = parent[-1] == "embed"
            w = jax.device_put(plain((*parent, "embedding" if embed else "kernel")),
                               place.get((*parent, "qvalue")))
            out[(*parent, "qvalue")], out[(*parent, "qscale")] = _quantize(
                jnp.asarray(w, dtype), cfg.quantize.weights, cfg.quantize.tile,
                -1 if embed else -2, dtype)
        else:
            out[key] = jnp.asarray(plain(key), target.dtype)
    for key, target in want.items():
        if tuple(out[key].shape) != tuple(target.shape):
            raise ValueError(f"{'.'.join(key)}: shape {tuple(out[key].shape)}, the adapted "
                             f"model needs {tuple(target.shape)}")
        if key in place:
            out[key] = jax.device_put(out[key], place[key])
    return traverse_util.unflatten_dict(out)


def dequantized(qvalue: np.ndarray, qscale: np.ndarray) -> np.ndarray:
    """A stored quantized weight as float32 numpy."""
    return np.asarray(quant.dequantize(jnp.asarray(qvalue), jnp.asarray(qscale), jnp.float32))


def with_delta(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """A kernel with its adapter folded in (float32): W + A B scale."""
    return np.asarray(jnp.asarray(w, jnp.float32) + _delta(jnp.asarray(a), jnp.asarray(b),
                                                            scale))


@jax.jit
def _delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    return jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale


_quantize = jax.jit(quant.quantize, static_argnums=(1, 2, 3, 4))


def merge(params: Mapping, cfg: ModelConfigLike) -> dict:
    """Adapted parameters -> plain ones: quantized weights dequantized, and each adapter folded
    into its kernel (W + A B alpha / rank), in the config's `param_dtype`."""
    cfg = ModelConfig.from_config(cfg)
    dtype = jnp.dtype(cfg.param_dtype)
    flat = _flat(params)
    out: Flat = {}
    for key, value in flat.items():
        parent, leaf = key[:-1], key[-1]
        if leaf in ("lora_a", "lora_b", "qscale"):
            continue
        if leaf == "qvalue":
            name = "embedding" if parent[-1] == "embed" else "kernel"
            out[(*parent, name)] = quant.dequantize(value, flat[(*parent, "qscale")], dtype)
        else:
            out[key] = value
    scale = cfg.lora.alpha / cfg.lora.rank if cfg.lora.rank else 0.0
    for key in [k for k in flat if k[-1] == "lora_a"]:
        kernel = (*key[:-1], "kernel")
        merged = out[kernel].astype(jnp.float32) + _delta(flat[key], flat[(*key[:-1], "lora_b")],
                                                          scale)
        out[kernel] = merged.astype(dtype)
    return traverse_util.unflatten_dict(out)


def adapters_of(params: Mapping) -> dict:
    """The LoRA parameters alone (what an adapter file holds)."""
    return traverse_util.unflatten_dict(
        {k: v for k, v in _flat(params).items() if k[-1] in ("lora_a", "lora_b")})


__all__ = ["adapt", "adapt_stream", "adapters_of", "dequantized", "fresh_adapters", "merge",
           "with_delta"]
