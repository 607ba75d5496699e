"""Local paths and bucket URLs (`gs://bucket/run`, also `s3://`) as one type, `etils.epath.Path`.

Everything a training run or a model directory writes and reads of its own goes through it, so a
workdir, `--ckpt`, `init_from` or tokenizer may be either; gcsfs (fsspec) carries gs:// for
epath, and Orbax and TensorStore write buckets themselves.
"""

from __future__ import annotations

import os
import uuid

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an absolute epath.Path. A URL is absolute as it is (epath's `absolute()` would
    put the working directory in front of `gs://`); a relative local path is made absolute,
    since Orbax reads no metadata through a relative one."""
    path = epath.Path(path)
    return path if path.is_absolute() else path.absolute()


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (gs://...), not the local file system."""
    return "://" in os.fspath(path)


def write_whole(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` (str: as UTF-8, unchanged) as the whole of `path`, never leaving half a file
    for a reader: a local file is written under a temporary name and renamed over `path`; an
    object appears whole when its upload ends (objects cannot be appended to or renamed cheaply)."""
    path = as_path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if is_url(path):
        path.write_bytes(raw)
        return
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
