"""Vision features computed once per set of images: the later turns of a conversation about an
image, and several questions about one image, reuse them (docs/design.md §5.7).

A prompt's images (their tiles in order, padded to `image.max_tiles`) go through the vision
tower and the connector in a program of their own, and the features [T, P, D] stay on the device
in a cache keyed by a hash of the tiles, the least recently used dropped first past `max_bytes`.
The sampler then takes `features` in place of `pixels`. The reuse is exact: the features depend
on the tiles alone. The prompt's keys and values are not reused: under bidirectional attention
every position of a turn attends to the turns after it, so they change as a conversation grows.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lladav_jax.data.image import ProcessedImage

Key = bytes  # `key(images)`; b"" for a prompt without images
MAX_BYTES = 1 << 30  # device memory kept for features by default (`Model.feature_cache_bytes`)


def key(images: Sequence[ProcessedImage]) -> Key:
    """The cache key of a prompt's images: a hash of their tiles, in order."""
    if not images:
        return b""
    h = hashlib.blake2b(digest_size=16)
    for image in images:
        tiles = np.ascontiguousarray(image.tiles)
        h.update(repr((tiles.shape, tiles.dtype.str)).encode())
        h.update(tiles.data)
    return h.digest()


class FeatureCache:
    """Features [T, P, D] per set of images (module docstring). Not thread-safe: `Model.decode`
    calls it under its lock. `encodes` counts the tower's runs, `hits` the batches that found
    a prompt's features already computed."""

    def __init__(self, module: nnx.Module, max_tiles: int, image_size: int,
                 max_bytes: int = MAX_BYTES):
        graphdef, state = nnx.split(module)
        encode = jax.jit(lambda s, pixels: nnx.merge(graphdef, s).encode_images(pixels))
        self._encode = lambda pixels: encode(state, pixels)
        self.pixel_shape = (max_tiles, image_size, image_size, 3)
        self.max_bytes = max_bytes
        self._rows: collections.OrderedDict[Key, jax.Array] = collections.OrderedDict()
        self._bytes = 0
        self.encodes = self.hits = 0

    def row(self, k: Key, images: Sequence[ProcessedImage]) -> jax.Array:
        """The features of one prompt's images (zeros, never read, for none)."""
        if k in self._rows:
            self._rows.move_to_end(k)
            self.hits += bool(images)
            return self._rows[k]
        if images:
            tiles = np.concatenate([img.tiles for img in images])
            if len(tiles) > self.pixel_shape[0]:  # `Model.prepare` refuses these first
                raise ValueError(f"{len(tiles)} tiles > image.max_tiles {self.pixel_shape[0]}")
            pixels = np.zeros(self.pixel_shape, np.float32)
            pixels[: len(tiles)] = tiles
            feats = self._encode(pixels)
            self.encodes += 1
        else:  # one zero row, shared by every prompt without images
            out = jax.eval_shape(self._encode, jax.ShapeDtypeStruct(self.pixel_shape,
                                                                    jnp.float32))
            feats = jnp.zeros(out.shape, out.dtype)
        self._rows[k] = feats
        self._bytes += feats.nbytes
        while self._bytes > self.max_bytes and len(self._rows) > 1:
            _, old = self._rows.popitem(last=False)
            self._bytes -= old.nbytes
        return feats

    def clear(self) -> None:
        """Drops every kept feature (their device memory is freed once no batch holds them)."""
        self._rows.clear()
        self._bytes = 0

    def batch(self, rows: Sequence[tuple[Key, Sequence[ProcessedImage]]]) -> jax.Array:
        """[B, T, P, D]: the rows' features, stacked on the device; rows with the same images
        (several questions about one image, a batch's filler rows) share one look-up."""
        got: dict[Key, jax.Array] = {}
        for k, images in rows:
            if k not in got:
                got[k] = self.row(k, images)
        return jnp.stack([got[k] for k, _ in rows])
