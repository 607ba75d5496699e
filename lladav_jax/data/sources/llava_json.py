"""Random-access source of raw LLaVA samples: JSON / JSONL files.

Every source here is a Grain random-access data source (`__len__`, `__getitem__(i) -> RawSample`,
picklable), so `grain.MapDataset.source(src)` takes it directly. See `example.py` for RawSample.

Bad data never raises from `__getitem__`: a line or object that is not a usable LLaVA sample
comes back as a RawSample with `"_error": "malformed: <what>"` (and no images), which the
featurizer turns into a counted `Skip("malformed")`. Missing image files are not checked here
(that would stat millions of files up front); the featurizer reports them when it opens them.
An image path that leaves the image folder (`sources.path_inside`) is kept as written and its
index listed in `_unsafe_images`: nothing opens it, and the featurizer skips the sample as
`unsafe_path`. A video sample's `video` path is read from the video folder the same way
(`videos`, `_unsafe_videos`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from lladav_jax.data.example import RawSample
from lladav_jax.data.sources import path_inside


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
    """LLaVA-format `.json` (one list) or `.jsonl` (one object a line) plus image and video
    folders.

    `images` holds absolute paths: each `image` entry joined to `image_folder` (default: the data
    file's directory), like the official `--data_path` / `--image_folder`. Files are not opened
    here; decoding (and the missing-file skip) happens later, in the worker processes. An entry
    that leaves the folder (`../x.png`, or an absolute path elsewhere) stays as written, listed
    in `_unsafe_images`, and is never opened (the featurizer counts it as `unsafe_path`).

    A `.jsonl` file is indexed by line offsets and each line is read and parsed on access, so
    10M-line files do not sit in memory. A `.json` list must be parsed whole once; its elements are
    then kept as compact JSON bytes (about the file's size), not as Python objects.

    Never raises on bad samples: an unparsable line, a non-object, `conversations` missing or not
    a list, or an `image` field that is not a path or list of paths gives a sample with
    `"_error": "malformed: <what>"` and the id `<file>:<line>` (`.jsonl`) or `<file>:[<index>]`
    (`.json`), which the featurizer counts as a skip. A file that is not JSON at all raises.
    """

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                 video_folder: str | os.PathLike | None = None):
        self.path = os.path.abspath(os.fspath(path))
        here = os.path.dirname(self.path)
        self.image_folder = os.path.abspath(here if image_folder is None
                                            else os.fspath(image_folder))
        # The official --video_folder; default the data file's directory, like images.
        self.video_folder = os.path.abspath(here if video_folder is None
                                            else os.fspath(video_folder))
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
        images, unsafe = [], []
        for k, f in enumerate(files):
            inside = path_inside(self.image_folder, f)
            if inside is None:
                unsafe.append(k)
            images.append(f if inside is None else inside)
        sample["images"] = images
        if unsafe:
            sample["_unsafe_images"] = unsafe
        video = sample.get("video")
        if video is not None:
            if not isinstance(video, str) or not video:
                return malformed(where, f"`video` must be a path (id {sample['id']})")
            inside = path_inside(self.video_folder, video)
            sample["videos"] = [video if inside is None else inside]
            if inside is None:
                sample["_unsafe_videos"] = [0]
        return sample

    def __repr__(self) -> str:
        return (f"LlavaJsonSource({self.path!r}, image_folder={self.image_folder!r}, "
                f"video_folder={self.video_folder!r})")
