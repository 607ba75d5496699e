"""Weighted mixtures of sources, each sample drawn by a stateless permutation (resumable)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lladav_jax.data.example import RawSample
from lladav_jax.data.sources import Source

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a cheap, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def permute_index(x: int, n: int, key: int) -> int:
    """A seeded bijection of range(n), evaluated one index at a time (no n-sized table).

    A 4-round Feistel network on the smallest even-bit power of two >= n, with cycle walking
    back into range(n) (fewer than 4 steps expected).
    """
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = bits // 2
    mask = (1 << half) - 1
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (_mix64(right ^ _mix64(key + r)) & mask)
        x = (left << half) | right
        if x < n:
            return x


class Mixture:
    """A deterministic weighted mixture of sources, itself one random-access source.

    Why our own and not `grain.MapDataset.mix`: Grain's mix interleaves in a fixed pattern and
    ends with the shortest input (upsampling needs `.repeat()` + slicing by hand), and it gives a
    `MapDataset`, not a source. This class has a chosen length (default: the sum of the sources'
    lengths, i.e. one "epoch" of the mix), so the pipeline shuffles, shards per process and
    checkpoints it exactly like a single source.

    How index i is drawn: slots are cut into blocks of `block` samples. Source k's cumulative
    count up to block b is `floor(w_k * block * b)` (the largest source takes the rest), so every
    source gets its weight's share to within a few samples over any prefix. Inside a block the
    slots are shuffled with a seed derived from (seed, b). Source k's j-th draw reads element
    `permute(j mod n_k)` of it, with a fresh seeded permutation per pass: an upsampled source
    shows every element once before any repeats; an undersampled one gives a random subset.

    Each sample is a copy with `_source` set to the source's name (its `name` attribute, else
    `source<k>`, unless `names` are given).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Sequence[float],
        seed: int = 0,
        length: int | None = None,
        names: Sequence[str] | None = None,
        block: int = 512,
    ):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"Mixture: {len(sources)} sources but {len(weights)} weights")
        w = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"Mixture: weights must be >= 0 with a positive sum, got {weights}")
        self.sources = list(sources)
        self.weights = w / w.sum()
        self.sizes = [len(s) for s in self.sources]
        for k, n in enumerate(self.sizes):
            if n == 0 and self.weights[k] > 0:
                raise ValueError(f"Mixture: source {k} is empty but has weight {weights[k]}")
        self.names = (
            list(names)
            if names is not None
            else [getattr(s, "name", None) or f"source{k}" for k, s in enumerate(self.sources)]
        )
        self.seed = int(seed)
        self.length = sum(self.sizes) if length is None else int(length)
        # The largest source absorbs the rounding; it stays >= 0 while block >= K * (K - 1).
        self.block = max(int(block), len(self.sources) ** 2)
        self._rest = int(np.argmax(self.weights))
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def _counts_before(self, b: int) -> np.ndarray:
        """How many of slots [0, b * block) each source gets."""
        counts = np.floor(self.weights * (self.block * b)).astype(np.int64)
        counts[self._rest] = 0
        counts[self._rest] = self.block * b - counts.sum()
        return counts

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, rank of the slot among its source's slots) for block b."""
        if (hit := self._cache.get(b)) is not None:
            return hit
        base = self._counts_before(b)
        counts = self._counts_before(b + 1) - base
        owner = np.repeat(np.arange(len(self.sources)), counts)
        np.random.default_rng([self.seed, b]).shuffle(owner)
        rank = np.empty_like(owner)
        for k in np.flatnonzero(counts):
            rank[owner == k] = base[k] + np.arange(counts[k])
        if len(self._cache) > 8:  # sequential reads hit; a random one costs ~0.15 ms
            self._cache = {}  # replaced, not cleared: safe under Grain's reader threads
        self._cache[b] = (owner, rank)
        return owner, rank

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index within that source) of mixture index `index`."""
        if not 0 <= index < self.length:
            raise IndexError(f"Mixture: index {index} out of range ({self.length})")
        owner, rank = self._block(index // self.block)
        k, j = int(owner[index % self.block]), int(rank[index % self.block])
        n = self.sizes[k]
        key = _mix64((self.seed << 32) ^ (k << 16) ^ (j // n))  # a new order for every pass
        return k, permute_index(j % n, n, key)

    def __getitem__(self, index: int) -> RawSample:
        k, j = self.locate(int(index))
        sample = dict(self.sources[k][j])
        sample["_source"] = self.names[k]
        return sample

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {w:.3g}" for n, w in zip(self.names, self.weights))
        return f"Mixture({{{parts}}}, seed={self.seed}, length={self.length})"
