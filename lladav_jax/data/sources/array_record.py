"""ArrayRecord shards of raw samples, with the image bytes inline (no image folder needed to train).

Record format (one ArrayRecord record per sample, written with `group_size:1` for random access):
a msgpack map (`use_bin_type`, so bytes and str stay apart) holding the sample's LLaVA fields as
they were (`id`, `conversations`, `image`, anything else) plus
  `images`: a list in `<image>` order; each entry is the encoded file's bytes, or, for a file
            that was missing or unreadable at pack time, its path as a str;
  `_missing_images`: the indices of those str entries (present only when there are any);
  `_unsafe_images`: kept from the source: indices of paths that leave the image folder, stored
            as the path (a str) and never read (the featurizer skips them as `unsafe_path`);
  `_error`: kept from the source for a malformed sample (the featurizer skips and counts it);
  `videos`, `_missing_videos`, `_unsafe_videos`: a video sample's one video, the same way.
Shards are `data-SSSSS-of-NNNNN.array_record`; `manifest.json` beside them holds the format name
and the pack counts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgpack

from lladav_jax.data.example import RawSample

FORMAT = "lladav-rawsample-msgpack-v1"
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads just that record


@dataclasses.dataclass
class PackStats:
    """Counts from packing; a missing image keeps its sample (marked), it is never dropped."""

    samples: int = 0
    images: int = 0
    missing_images: int = 0
    samples_with_missing_images: int = 0
    unsafe_paths: int = 0  # paths outside the image/video folder: not read, kept as marked
    videos: int = 0
    missing_videos: int = 0
    malformed: int = 0
    record_bytes: int = 0

    def add(self, sample: RawSample, size: int) -> None:
        self.samples += 1
        self.images += len(sample.get("images", ()))
        missing = len(sample.get("_missing_images", ()))
        self.missing_images += missing
        self.samples_with_missing_images += missing > 0
        self.unsafe_paths += len(sample.get("_unsafe_images", ())) + len(
            sample.get("_unsafe_videos", ()))
        self.videos += len(sample.get("videos", ()))
        self.missing_videos += len(sample.get("_missing_videos", ()))
        self.malformed += "_error" in sample
        self.record_bytes += size

    def summary(self) -> str:
        mib = self.record_bytes / 2**20
        return (
            f"{self.samples} samples, {self.images} images ({mib:.1f} MiB of records); "
            f"{self.missing_images} images missing in {self.samples_with_missing_images} "
            f"samples (kept, marked); {self.videos} videos, {self.missing_videos} missing "
            f"(kept, marked); {self.unsafe_paths} paths outside the image or video "
            f"folder (not read, marked); {self.malformed} malformed (kept, marked)"
        )


def _read_files(sample: RawSample, key: str, missing_key: str, unsafe_key: str) -> RawSample:
    """The sample with each path in `key` replaced by the file's bytes; an unreadable one stays
    a path (a str) with its index in `missing_key`; one listed in `unsafe_key` is never read."""
    files, missing = [], []
    unsafe = sample.get(unsafe_key, ())
    for k, ref in enumerate(sample.get(key, ())):
        if isinstance(ref, (bytes, bytearray, memoryview)):
            files.append(bytes(ref))
            continue
        if k in unsafe:
            files.append(os.fspath(ref))
            continue
        try:
            with open(ref, "rb") as f:
                files.append(f.read())
        except OSError:  # missing, a directory, no permission: all "not there" for training
            files.append(os.fspath(ref))
            missing.append(k)
    out = {**sample, key: files} if key in sample else dict(sample)
    if missing:
        out[missing_key] = sorted(set(out.get(missing_key, [])) | set(missing))
    return out


def with_image_bytes(sample: RawSample) -> RawSample:
    """The sample with each image path (and a video sample's video path) replaced by the file's
    bytes.

    A file that cannot be read stays as its path (a str) and its index goes to `_missing_images`
    (`_missing_videos`), so the featurizer skips the sample as missing_image (missing_video) and
    counts it. A path the source listed in `_unsafe_images` (`_unsafe_videos`, outside its
    folder) stays as it is, never opened.
    """
    sample = _read_files({"images": [], **sample}, "images", "_missing_images",
                         "_unsafe_images")
    return _read_files(sample, "videos", "_missing_videos", "_unsafe_videos")


def encode_sample(sample: RawSample) -> bytes:
    return msgpack.packb(sample, use_bin_type=True)


def decode_sample(record: bytes) -> RawSample:
    return msgpack.unpackb(record, raw=False)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def loaded_samples(samples: Iterable[RawSample], num_threads: int = 8) -> Iterator[RawSample]:
    """`with_image_bytes` over samples, in order, reading files on a few threads (I/O bound)."""
    if num_threads <= 1:
        yield from map(with_image_bytes, samples)
        return
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for chunk in _chunks(samples, 64 * num_threads):  # bounded: never the whole iterable
            yield from pool.map(with_image_bytes, chunk)


def shard_name(shard: int, num_shards: int) -> str:
    return f"data-{shard:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def write_array_records(
    samples: Iterable[RawSample],
    out_dir: str | os.PathLike,
    num_shards: int,
    num_threads: int = 8,
) -> PackStats:
    """Writes samples (image paths read into bytes) as msgpack records into `num_shards` shards.

    When `samples` has a length, shard s holds a contiguous range, so reading the shards in order
    gives the samples in their original order; otherwise samples go round-robin. Shards are written
    under temporary names and renamed when complete; existing shards in `out_dir` are an error
    (nothing already written is overwritten).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    os.makedirs(out_dir, exist_ok=True)
    if existing := sorted(glob.glob(os.path.join(out_dir, "*" + SHARD_SUFFIX))):
        raise FileExistsError(
            f"{out_dir} already holds shards ({existing[0]}, ...); pick an empty directory"
        )
    total = len(samples) if hasattr(samples, "__len__") else None
    finals = [os.path.join(out_dir, shard_name(s, num_shards)) for s in range(num_shards)]
    writers = [ArrayRecordWriter(p + ".tmp", WRITER_OPTIONS) for p in finals]
    stats = PackStats()
    try:
        for i, sample in enumerate(loaded_samples(samples, num_threads)):
            record = encode_sample(sample)
            shard = i * num_shards // total if total else i % num_shards
            writers[shard].write(record)
            stats.add(sample, len(record))
    finally:
        for w in writers:
            w.close()
    for p in finals:
        os.replace(p + ".tmp", p)
    manifest = {
        "format": FORMAT,
        "shards": [os.path.basename(p) for p in finals],
        "stats": dataclasses.asdict(stats),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return stats


def shard_paths(path_or_glob: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard files from a directory (all `*.array_record` in it), a glob, a file, or a list."""
    if not isinstance(path_or_glob, (str, os.PathLike)):
        return [p for item in path_or_glob for p in shard_paths(item)]
    path = os.fspath(path_or_glob)
    if os.path.isdir(path):
        paths = sorted(glob.glob(os.path.join(path, "*" + SHARD_SUFFIX)))
    elif glob.has_magic(path):
        paths = sorted(glob.glob(path))
    else:
        paths = [path] if os.path.exists(path) else []
    if not paths:
        raise FileNotFoundError(f"no ArrayRecord shards at {path}")
    return paths


class ArrayRecordSource:
    """Random access over packed shards (see the module docstring for the record format)."""

    def __init__(self, path_or_glob: str | os.PathLike | Sequence[str | os.PathLike]):
        import grain

        self.paths = shard_paths(path_or_glob)
        self.name = os.path.basename(os.path.dirname(os.path.abspath(self.paths[0])))
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> RawSample:
        return decode_sample(self._records[int(index)])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards at {os.path.dirname(self.paths[0])})"


def pack(
    json_path: str | os.PathLike,
    image_folder: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    num_shards: int,
    num_threads: int = 8,
    video_folder: str | os.PathLike | None = None,
) -> PackStats:
    """Packs a LLaVA `.json`/`.jsonl` and its images and videos into ArrayRecord shards; prints
    the counts."""
    from lladav_jax.data.sources.llava_json import LlavaJsonSource

    source = LlavaJsonSource(json_path, image_folder, video_folder)
    stats = write_array_records(source, out_dir, num_shards, num_threads)
    print(f"packed {json_path} -> {out_dir} ({num_shards} shards): {stats.summary()}")
    return stats
