"""Weight-only quantization as pure functions: int8 or int4 values with float scales.

The numerics are qwix's (`qwix.quantize` / `qwix.dequantize`: symmetric absmax, int8 with one
scale per output channel, int4 with one per `tile` inputs of each output channel). A weight is
stored as two arrays, `qvalue` (int8 / int4) and `qscale`, so checkpoints, shardings and
integrity checksums treat them like any parameter. NF4 is not offered: its uint4 codes have no
TensorStore dtype, so they could not be checkpointed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix

FORMATS = {"int8": jnp.int8, "int4": jnp.int4}


def tile_for(fmt: str, width: int, tile: int) -> int:
    """Inputs sharing one scale: all of them for int8 (per output channel), `tile` for int4
    (the whole width when the layer is narrower). A ValueError when `tile` does not divide it."""
    if fmt == "int8" or width <= tile:
        return width
    if width % tile:
        raise ValueError(f"quantize.tile {tile} does not divide a weight's input width {width}; "
                         "choose a divisor of it")
    return tile


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {list(FORMATS)}")


def quantize(w: jax.Array, fmt: str, tile: int, axis: int = -2,
             scale_dtype: jnp.dtype | None = None) -> tuple[jax.Array, jax.Array]:
    """w -> (qvalue, scale). `axis` is the one summed over in the product (a kernel's inputs,
    an embedding row's features); every other axis gets its own scales."""
    check_format(fmt)
    axis %= w.ndim
    others = tuple(i for i in range(w.ndim) if i != axis)
    q = qwix.quantize(w, FORMATS[fmt], channelwise_axes=others,
                      tiled_axes={axis: tile_for(fmt, w.shape[axis], tile)},
                      scale_dtype=scale_dtype or w.dtype)
    return q.qvalue, q.scale


def dequantize(qvalue: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """(qvalue, scale) -> the weight in `dtype`."""
    return qwix.dequantize(qwix.QArray(qvalue, scale.astype(dtype), qtype=qvalue.dtype))
