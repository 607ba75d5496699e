"""Random-access sources of raw LLaVA samples: JSON / JSONL files, and weighted mixtures.

Every source here is a Grain random-access data source (`__len__`, `__getitem__(i) -> RawSample`,
picklable), so `grain.MapDataset.source(src)` takes it directly. See `example.py` for RawSample.

Bad data never raises from `__getitem__`: a line or object that is not a usable LLaVA sample
comes back as a RawSample with `"_error": "malformed: <what>"` (and no images), which the
featurizer turns into a counted `Skip("malformed")`. Missing image files are not checked here
(that would stat millions of files up front); the featurizer reports them when it opens them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from lladav_jax.data.example import RawSample


class Source(Protocol):
    """What a Grain random-access source provides."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> RawSample: ...


def malformed(sample_id: str, what: str) -> RawSample:
    """A placeholder for a sample that is not LLaVA format; the featurizer counts it as skipped."""
    return {"id": sample_id, "conversations": [], "images": [], "_error": f"malformed: {what}"}


def image_files(sample: dict[str, Any]) -> list[str] | str:
    """The sample's image paths in `<image>` order, or a str saying why the field is unusable."""
    image = sample.get("image")
    if image is None:
        return []
    files = [image] if isinstance(image, str) else image
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return "`image` must be a path or a list of paths"
    if any(not f for f in files):
        return "`image` holds an empty path"
    return files


def parse_sample(obj: Any, where: str) -> RawSample | str:
    """Checks the fields every later stage relies on; returns the sample (sans images) or why not.

    Deeper checks (roles, turn order, `<image>` tag counts) belong to the template/featurizer.
    """
    if not isinstance(obj, dict):
        return f"not a JSON object ({type(obj).__name__})"
    if not isinstance(obj.get("conversations"), list):
        return "`conversations` missing or not a list"
    sample = dict(obj)
    # LLaVA data has int ids, duplicate ids and no ids at all; a str id that names the spot helps.
    sample["id"] = where if obj.get("id") is None else str(obj["id"])
    return sample


def _line_index(path: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start offsets, lengths and 1-based line numbers of the non-empty lines, read in chunks.

    Only the offsets are kept (16 bytes a line), so a 10M-line file costs ~240 MB of index at most,
    never the parsed objects.
    """
    newlines, base = [], 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 0x0A) + base)
            base += len(block)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [base]]).astype(np.int64)
    lines = np.arange(1, len(starts) + 1, dtype=np.int64)
    keep = ends > starts  # blank lines (and the empty tail after a final newline) are not samples
    return starts[keep], (ends - starts)[keep], lines[keep]


class LlavaJsonSource:
    """LLaVA-format `.json` (one list) or `.jsonl` (one object a line) plus an image folder.

    `images` holds absolute paths: each `image` entry joined to `image_folder` (default: the data
    file's directory), like the official `--data_path` / `--image_folder`. Files are not opened
    here; decoding (and the missing-file skip) happens later, in the worker processes.

    A `.jsonl` file is indexed by line offsets and each line is read and parsed on access, so
    10M-line files do not sit in memory. A `.json` list must be parsed whole once; its elements are
    then kept as compact JSON bytes (about the file's size), not as Python objects.

    Never raises on bad samples: an unparsable line, a non-object, `conversations` missing or not
    a list, or an `image` field that is not a path or list of paths gives a sample with
    `"_error": "malformed: <what>"` and the id `<file>:<line>` (`.jsonl`) or `<file>:[<index>]`
    (`.json`), which the featurizer counts as a skip. A file that is not JSON at all raises.
    """

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None = None):
        self.path = os.path.abspath(os.fspath(path))
        folder = os.path.dirname(self.path) if image_folder is None else os.fspath(image_folder)
        self.image_folder = os.path.abspath(folder)
        self.name = os.path.basename(self.path)
        self._blob: bytes | None = None  # `.json`: the elements, re-encoded back to back
        if self.path.endswith(".jsonl"):
            self._starts, self._lengths, self._lines = _line_index(self.path)
        else:
            self._load_json_list()

    def _load_json_list(self) -> None:
        with open(self.path, "rb") as f:
            try:
                items = json.load(f)
            except ValueError as e:
                raise ValueError(
                    f"{self.path}: not valid JSON ({e}); use .jsonl for one object a line"
                ) from e
        if not isinstance(items, list):
            raise ValueError(
                f"{self.path}: expected a JSON list of samples, got {type(items).__name__}"
            )
        encoded = [json.dumps(x, ensure_ascii=False).encode() for x in items]
        del items
        self._lengths = np.array([len(e) for e in encoded], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]]).astype(np.int64)
        self._lines = None
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._starts)

    def _where(self, index: int) -> str:
        if self._lines is None:
            return f"{self.name}:[{index}]"
        return f"{self.name}:{int(self._lines[index])}"

    def _raw(self, index: int) -> bytes:
        start, length = int(self._starts[index]), int(self._lengths[index])
        if self._blob is not None:
            return self._blob[start : start + length]
        # Opened per read: no handle to share across forked workers or to leak; cheap next to
        # image decoding.
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(length)

    def __getitem__(self, index: int) -> RawSample:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range ({len(self)} samples)")
        index %= len(self)
        where = self._where(index)
        try:
            obj = json.loads(self._raw(index))
        except ValueError as e:  # includes UnicodeDecodeError
            return malformed(where, f"invalid JSON ({e})")
        sample = parse_sample(obj, where)
        if isinstance(sample, str):
            return malformed(where, sample)
        files = image_files(sample)
        if isinstance(files, str):
            return malformed(where, f"{files} (id {sample['id']})")
        sample["images"] = [os.path.join(self.image_folder, f) for f in files]
        return sample

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.path!r}, image_folder={self.image_folder!r})"


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
