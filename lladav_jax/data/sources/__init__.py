"""Where raw samples come from: LLaVA JSON/JSONL (`llava_json`), ArrayRecord shards
(`array_record`), TFDS (`tfds`) and weighted mixtures of them (`mixture`).

Each is a Grain random-access source: `__len__`, `__getitem__(i) -> RawSample`, picklable.
"""

from __future__ import annotations

from typing import Protocol

from lladav_jax.data.example import RawSample


class Source(Protocol):
    """What a Grain random-access source provides."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> RawSample: ...
