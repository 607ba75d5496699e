"""Is a training state what was saved, and is it finite?

A checkpoint's `meta` item carries a checksum of every array of the state saved (the
parameters and the optimizer state), computed on the chips just before the save; a restore
computes the same checksums of what it read and compares. So flipped bytes in any file, a
chunk from another checkpoint, or a storage layer that returns stale data are caught at the
restore that would have trained on them, whatever the storage format does or does not verify.

The checksum of an array is two 32-bit sums of its raw words: their plain sum and their sum
weighted by position (Fletcher-style), wrapping on overflow. Integer sums are exact in any
order, so the figures do not depend on the mesh, the sharding or the device count. It is no
cryptographic hash: it catches damage, not a forger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_WEIGHT = np.uint32(2654435761)  # Knuth's multiplicative constant: positions spread over 2^32


def _words(x: jax.Array) -> jax.Array:
    """The array's raw bits as uint32, one word per element (narrower types zero-extended)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8:  # int4 weights
        return x.astype(jnp.int32).astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _summary(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(checksum [2] uint32, all finite) of one array."""
    words = _words(x)
    position = jax.lax.broadcasted_iota(jnp.uint32, (words.size,), 0).reshape(words.shape)
    checksum = jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                          jnp.sum(words * (position * _WEIGHT + 1), dtype=jnp.uint32)])
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return checksum, jnp.asarray(finite)


_summaries = jax.jit(lambda tree: jax.tree.map(_summary, tree))


def _named(tree: Any) -> dict[str, Any]:
    """The leaves of `tree` by path ('llm/layers/attn/q/kernel', 'opt_state/0/mu/...')."""
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)

    return {name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def summarize(trees: Mapping[str, Any]) -> tuple[dict[str, list[int]], list[str]]:
    """(checksums by array name, names of the arrays holding NaN or inf) of the named trees
    of device arrays, e.g. {"params": ..., "opt_state": ...}. Waits for the arrays."""
    named = _named(dict(trees))
    out = jax.device_get(_summaries(named))
    checksums = {k: [int(v) for v in np.asarray(c)] for k, (c, _) in out.items()}
    nonfinite = [k for k, (_, finite) in out.items() if not bool(finite)]
    return checksums, nonfinite


def mismatches(saved: Mapping[str, list[int]], restored: Mapping[str, list[int]]) -> list[str]:
    """The arrays whose restored checksum differs from the saved one, or that are in one of
    the two only."""
    return sorted(k for k in set(saved) | set(restored) if saved.get(k) != restored.get(k))


def listed(names: list[str], most: int = 5) -> str:
    """'a, b, c and 4 more': a few names of a long list, for a one-line message."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
