"""The model's linear layers and token embedding, with LoRA adapters and quantized weights.

`Dense` is every linear layer of the model: `kernel` [in, out] (and `bias` [out]) as
`nnx.Linear` stores them, or, quantized (`lladav_jax.models.quant`), `qvalue` + `qscale` in
place of `kernel`. With LoRA it also holds `lora_a` [in, rank] and `lora_b` [rank, out]
(`nnx.LoRAParam`, float32 whatever the base's dtype):

    y = x W + dropout(x) A B * alpha / rank

B starts at zero, so a fresh adapter computes exactly the base layer.

Why not qwix's LoRA and PTQ providers: they create their parameters on the first call of the
model, on the module that makes the call. Our layers are stacked and run by `lax.scan`
(`layers.run_layers`), whose body merges a per-layer copy of the module inside a trace: an
adapter created there would have one layer's shape and never reach the model. So adapters and
quantized weights are declared here, stacked like every other parameter, and qwix does the
quantization arithmetic (`quant`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lladav_jax.models import quant


def axes(*names: str | None) -> dict:
    """Variable metadata naming the logical axes (see `layers.axes`)."""
    return {"out_sharding": names, "eager_sharding": False}


class QuantizedParam(nnx.Param):
    """A frozen weight's quantized values or scales: saved, restored and sharded like any
    parameter, never trained (no LoRA run differentiates it; `config_check` refuses a run
    that would)."""


@dataclasses.dataclass(frozen=True)
class Adapt:
    """What one layer gets: LoRA (rank > 0) and/or a weight format (`quant.FORMATS`);
    `ModelConfig.adapt(name)` makes it from the config."""

    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    weights: str = "none"
    tile: int = 128


NONE = Adapt()


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity without a key (inference) or at rate 0."""
    if rng is None or rate == 0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Dense(nnx.Module):
    """x [..., in] -> [..., out]."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str | None, ...], dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs, *, use_bias: bool = False,
                 std: float = 0.02, adapt: Adapt = NONE) -> None:
        self.dtype, self.adapt = dtype, adapt
        kernel = nnx.initializers.normal(std)(rngs.params(), (d_in, d_out), param_dtype)
        if adapt.weights == "none":
            self.kernel = nnx.Param(kernel, **axes(*names))
        else:
            qvalue, scale = quant.quantize(kernel, adapt.weights, adapt.tile)
            self.qvalue = QuantizedParam(qvalue, **axes(*names))
            self.qscale = QuantizedParam(scale, **axes(None, names[-1]))
        self.bias = (nnx.Param(jnp.zeros((d_out,), param_dtype), **axes(names[-1]))
                     if use_bias else None)
        if adapt.rank:
            # A as PEFT initialises it (kaiming-uniform, a = sqrt(5)); B zero.
            bound = 1.0 / math.sqrt(d_in)
            self.lora_a = nnx.LoRAParam(jax.random.uniform(
                rngs.params(), (d_in, adapt.rank), jnp.float32, -bound, bound),
                **axes(names[0], None))
            self.lora_b = nnx.LoRAParam(jnp.zeros((adapt.rank, d_out), jnp.float32),
                                        **axes(None, names[-1]))

    def weight(self) -> jax.Array:
        """The base weight [in, out] in the compute dtype (dequantized if stored quantized)."""
        if self.adapt.weights == "none":
            return self.kernel[...].astype(self.dtype)
        return quant.dequantize(self.qvalue[...], self.qscale[...], self.dtype)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`rng`: the adapter's dropout key (training); None computes without dropout."""
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.weight())
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.adapt.rank:
            h = jnp.dot(dropout(x, self.adapt.dropout, rng), self.lora_a[...].astype(self.dtype))
            y = y + jnp.dot(h, self.lora_b[...].astype(self.dtype)) * (
                self.adapt.alpha / self.adapt.rank)
        return y


class Embedding(nnx.Module):
    """Token ids [...] -> rows [..., D] of a table [vocab, D], stored as `embedding` (like
    `nnx.Embed`) or quantized (`qvalue` + `qscale`, one scale per row or per `tile` of it)."""

    def __init__(self, vocab: int, dim: int, names: tuple[str, str], dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs, *, weights: str = "none",
                 tile: int = 128) -> None:
        self.dtype, self.weights = dtype, weights
        table = nnx.initializers.normal(0.02)(rngs.params(), (vocab, dim), param_dtype)
        if weights == "none":
            self.embedding = nnx.Param(table, **axes(*names))
        else:
            qvalue, scale = quant.quantize(table, weights, tile, axis=-1)
            self.qvalue = QuantizedParam(qvalue, **axes(*names))
            self.qscale = QuantizedParam(scale, **axes(names[0], None))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.weights == "none":
            return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
        rows = jnp.take(self.qvalue[...], tokens, axis=0)
        return quant.dequantize(rows, jnp.take(self.qscale[...], tokens, axis=0), self.dtype)
