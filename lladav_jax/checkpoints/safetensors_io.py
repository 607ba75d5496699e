"""Streaming safetensors I/O without torch: read one tensor (or a row range) at a time, write
sharded checkpoints with a `model.safetensors.index.json`, one block of rows at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{key: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}` and the raw
little-endian tensor bytes. Reading uses `os.pread` into a fresh buffer rather than a memory
map, so that resident memory is the rows asked for, never the pages of a whole file; in a bucket
(gs://..., `lladav_jax.paths`) a ranged read does the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
from etils import epath

from lladav_jax import paths

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes <-> numpy. bf16 comes from ml_dtypes (numpy has none).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A malformed file or index; the message names the file (and key) at fault."""


def dtype_code(dtype) -> str:
    """numpy dtype (or name, e.g. 'bfloat16') -> safetensors code; raises for unknown dtypes."""
    d = np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)
    if d not in CODES:
        raise SafetensorsError(f"dtype {d} has no safetensors code; known: {sorted(DTYPES)}")
    return CODES[d]


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """One stored tensor; nothing is read until it is indexed (`t[r0:r1]`, `t[:]`, np.asarray).

    `code` is the stored dtype code; `dtype` is None when numpy has no such type (the importer
    reports those keys instead of failing on first touch).
    """

    path: epath.Path
    key: str
    code: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def dtype(self) -> np.dtype | None:
        return DTYPES.get(self.code)

    def _read(self, start: int, count: int) -> np.ndarray:
        if self.dtype is None:
            raise SafetensorsError(f"{self.path}: {self.key} has unsupported dtype {self.code}")
        buf = np.empty(count, self.dtype)
        view = memoryview(buf.view(np.uint8))
        at = self.offset + start * self.dtype.itemsize
        if paths.is_url(self.path):
            with self.path.open("rb") as f:
                f.seek(at)
                if f.readinto(view) != view.nbytes:
                    raise SafetensorsError(f"{self.path}: {self.key} is truncated")
            return buf
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pos, want = 0, count * self.dtype.itemsize
            while pos < want:  # pread may return short reads for large sizes
                n = os.preadv(fd, [view[pos:]], at + pos)
                if n <= 0:
                    raise SafetensorsError(f"{self.path}: {self.key} is truncated")
                pos += n
        finally:
            os.close(fd)
        return buf

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along the first axis (the whole tensor for 0-d)."""
        if not self.shape:
            return self._read(0, 1).reshape(())
        row = math.prod(self.shape[1:])
        return self._read(start * row, (stop - start) * row).reshape(stop - start, *self.shape[1:])

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice) and index.step in (None, 1) and self.shape:
            start, stop, _ = index.indices(self.shape[0])
            return self.rows(start, max(start, stop))
        return self.rows(0, self.shape[0] if self.shape else 1)[index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self.rows(0, self.shape[0] if self.shape else 1)
        return x if dtype is None else x.astype(dtype)


def read_header(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """The tensors of one .safetensors file (header only; no tensor data is read)."""
    path = paths.as_path(path)
    size = path.stat().length
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        t = LazyTensor(path, key, info["dtype"], shape, base + begin, end - begin)
        if t.dtype is not None and t.nbytes != math.prod(shape) * t.dtype.itemsize:
            raise SafetensorsError(f"{path}: {key} holds {t.nbytes} bytes, not {shape} {t.code}")
        if base + end > size:
            raise SafetensorsError(f"{path}: {key} runs past the end of the file (truncated?)")
        out[key] = t
    return out


def open_checkpoint(directory: str | os.PathLike) -> dict[str, LazyTensor]:
    """All tensors of a Hugging Face checkpoint directory, lazily.

    Uses `model.safetensors.index.json` when present (every listed file must exist and hold
    exactly the keys the index gives it); otherwise every `*.safetensors` file in the directory.
    """
    directory = paths.as_path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise SafetensorsError(f"{directory}: no {INDEX_FILE} and no *.safetensors files")
    tensors: dict[str, LazyTensor] = {}
    for name in files:
        if not (directory / name).exists():
            raise SafetensorsError(f"{index}: lists {name}, which does not exist")
        for key, t in read_header(directory / name).items():
            if key in tensors:
                raise SafetensorsError(f"{directory}: {key} is stored twice ({name})")
            tensors[key] = t
    if weight_map is not None:
        wrong = sorted(k for k, f in weight_map.items() if k not in tensors or
                       tensors[k].path.name != f)
        extra = sorted(k for k in tensors if k not in weight_map)
        if wrong or extra:
            raise SafetensorsError(
                f"{index} does not match its files: listed but not found there: {wrong[:20]}; "
                f"stored but not listed: {extra[:20]}"
            )
    return tensors


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: shape and dtype up front, data as row blocks produced on demand."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Callable[[], Iterable[np.ndarray]]  # row blocks, in order, together `shape`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(
    tensors: Sequence[PendingTensor], max_shard_bytes: int
) -> list[list[PendingTensor]]:
    """Greedy, in order: a new shard starts when the next tensor would pass the limit (a tensor
    larger than the limit gets a shard of its own), as transformers shards."""
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: Sequence[PendingTensor], metadata: Mapping[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for t in tensors:
        header[t.key] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_file(
    path: str | os.PathLike,
    tensors: Sequence[PendingTensor],
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Writes one .safetensors file, streaming each tensor's row blocks to disk (or a bucket)."""
    with paths.as_path(path).open("wb") as f:
        f.write(_header_bytes(tensors, metadata or {"format": "pt"}))
        for t in tensors:
            written = 0
            for block in t.blocks():
                block = np.ascontiguousarray(block, dtype=t.dtype)
                f.write(memoryview(block.view(np.uint8).reshape(-1)))
                written += block.nbytes
            if written != t.nbytes:
                raise SafetensorsError(f"{path}: {t.key} got {written} bytes, expected {t.nbytes}")
            if on_tensor is not None:
                on_tensor(t.key)


def write_sharded(
    directory: str | os.PathLike,
    tensors: Sequence[PendingTensor],
    max_shard_bytes: int = 5 * 10**9,
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> dict:
    """Writes `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`
    into an existing directory; returns the index."""
    directory = paths.as_path(directory)
    keys = [t.key for t in tensors]
    if len(set(keys)) != len(keys):
        raise SafetensorsError(f"duplicate keys: {sorted({k for k in keys if keys.count(k) > 1})}")
    shards = plan_shards(tensors, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(directory / name, shard, metadata, on_tensor)
        weight_map.update({t.key: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def pending(key: str, array: np.ndarray, dtype=None) -> PendingTensor:
    """A PendingTensor for an in-memory array (tests, small tensors)."""
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    return PendingTensor(key, tuple(array.shape), dtype, lambda: [np.asarray(array, dtype)])

