"""Where raw samples come from: LLaVA JSON/JSONL (`llava_json`), ArrayRecord shards
(`array_record`), TFDS (`tfds`) and weighted mixtures of them (`mixture`).

Each is a Grain random-access source: `__len__`, `__getitem__(i) -> RawSample`, picklable.
"""

from __future__ import annotations

import os
from typing import Protocol

from lladav_jax.data.example import RawSample


class Source(Protocol):
    """What a Grain random-access source provides."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> RawSample: ...


def path_inside(folder: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """`path` (relative to `folder`, or absolute) as a normalised absolute path when it lies
    strictly inside `folder`; None when it leaves it (an absolute path elsewhere, or `..`
    parts that climb out once the path is normalised). The one definition every reader of
    data-named files uses (training sources, packing, TFDS building, eval rows).

    The check is lexical: symlinks are not resolved, so a data set folder whose entries link
    to another disk still works. What it refuses is a data file's text naming a file outside
    the folder; a symlink inside the folder was placed by whoever owns the folder. Open the
    path returned, not `path`: the system applies `..` after following a symlink, so
    `link/../x` could leave the folder where the normalised `x` does not."""
    base = os.path.abspath(os.fspath(folder))
    full = os.path.normpath(os.path.join(base, os.fspath(path)))
    # commonpath, not startswith: /data/img must not contain /data/img2/x.png.
    if full != base and os.path.commonpath([base, full]) == base:
        return full
    return None
