"""Bytes of arrays as the chips hold them: each leaf's shard, int4 at half a byte.

JAX is imported inside the functions, as in `plan`: the CLI sets the device count first.
"""

from __future__ import annotations

import math
from typing import Any

GIB = 1024**3


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs: every leaf's
    shard (`sharding.shard_shape`; replicated leaves count whole on every device)."""
    import jax

    return sum(nbytes(shard_shape(leaf), leaf.dtype) for leaf in jax.tree.leaves(tree))


def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of an array at its real storage size: int4 packs two values a byte (XLA's
    buffer assignment counts `s4` so, on the CPU as on TPUs and GPUs), where numpy's itemsize
    would say one byte each."""
    import jax

    return -(-math.prod(shape) * jax.dtypes.itemsize_bits(dtype) // 8)


def shard_shape(leaf) -> tuple[int, ...]:
    """One device's shard of a leaf; a dimension its mesh axes do not divide is padded to the
    ceiling, as XLA pads it (`Sharding.shard_shape` refuses those)."""
    from jax.sharding import NamedSharding

    sharding = leaf.sharding
    if not isinstance(sharding, NamedSharding):
        return sharding.shard_shape(leaf.shape)
    from lladav_jax.scale.sharding import axes_size

    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    return tuple(-(-dim // axes_size(sharding.mesh, axes)) for dim, axes in zip(leaf.shape, spec))


def global_bytes(tree) -> int:
    import jax

    return sum(nbytes(x.shape, x.dtype) for x in jax.tree.leaves(tree))
