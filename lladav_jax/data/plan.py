"""The plan of a window: which samples make which rows of which batches, at which length.

Made from the samples' measures (`Featurizer.measure`: tokens, tiles and visual tokens, no
pixels), so every process can make the whole plan cheaply and identically, and then decode
only the images of its own rows (`data/pipeline.py`). A window's plan is a pure function of its
index: the samples of the window, their measures and a seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Sized(Protocol):
    """What planning reads of a sample (`Measured`): its length, tiles and visual tokens."""

    def __len__(self) -> int: ...

    @property
    def num_tiles(self) -> int: ...

    @property
    def num_visual_tokens(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence of a batch: one sample, or several packed ones (measures, examples, or
    `pipeline.Padding` where a sample failed)."""

    examples: tuple[Any, ...]

    @property
    def length(self) -> int:
        return sum(len(e) for e in self.examples)


def _fits(row: list[Sized], item: Sized, seq_len: int, image_cfg: Any) -> bool:
    return (
        sum(len(e) for e in row) + len(item) <= seq_len
        and sum(e.num_tiles for e in row) + item.num_tiles <= image_cfg.max_tiles
        and (sum(e.num_visual_tokens for e in row) + item.num_visual_tokens
             <= image_cfg.max_visual_tokens)
    )


def pack_rows(items: Sequence[Sized], seq_len: int, image_cfg: Any) -> list[Row]:
    """First-fit decreasing: longest first, each into the first row with room (tokens, tiles and
    visual tokens), so that short samples fill the gaps that long ones leave."""
    rows: list[list[Sized]] = []
    for item in sorted(items, key=len, reverse=True):
        for row in rows:
            if _fits(row, item, seq_len, image_cfg):
                row.append(item)
                break
        else:
            rows.append([item])
    return [Row(tuple(r)) for r in rows]


def group_rows(items: Sequence[Sized], by_length: bool) -> list[Row]:
    """One sample per row; sorted by length so that a batch holds similar lengths."""
    order = sorted(items, key=len) if by_length else list(items)
    return [Row((e,)) for e in order]


def length_buckets(data: Any) -> tuple[int, ...]:
    """Allowed batch lengths: `data.length_buckets`, or quarter, half and full seq_len."""
    buckets = data.get("length_buckets") or (data.seq_len // 4, data.seq_len // 2)
    if max(buckets) > data.seq_len:
        raise ValueError(f"length_buckets {buckets} exceed seq_len {data.seq_len}")
    return tuple(sorted({*buckets, data.seq_len}))


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """One global batch: per row, the window positions of its samples (in row order); the
    batch length; and counts over the whole batch (every process knows them)."""

    rows: tuple[tuple[int, ...], ...]
    length: int
    num_samples: int
    num_tokens: int  # non-padding tokens
    num_tiles: int  # real image tiles


@dataclasses.dataclass(frozen=True)
class Planner:
    """Measures of a window -> its batches: packed or length-grouped rows, cut into
    `batch_size`-row batches, the batches shuffled (seeded by the window's index)."""

    seq_len: int
    batch_size: int
    pack: bool
    group_by_length: bool
    seed: int
    image_cfg: Any
    buckets: tuple[int, ...] = ()  # sequence lengths a batch may take (sorted; last = seq_len)

    def __call__(self, index: int, measures: Sequence[Sized | None]) -> list[PlannedBatch]:
        """`measures[k]`: the measure of the window's k-th sample, None if it was skipped."""
        kept = [m for m in measures if m is not None]
        where = {id(m): k for k, m in enumerate(measures) if m is not None}
        if self.pack:
            rows = pack_rows(kept, self.seq_len, self.image_cfg)
        else:
            rows = group_rows(kept, self.group_by_length)
        chunks = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        # Sorted rows make batches ordered by length; shuffle the batches of the window.
        order = np.random.default_rng([self.seed, index]).permutation(len(chunks))
        batches = []
        for k in order:
            chunk = chunks[k]
            items = [m for row in chunk for m in row.examples]
            batches.append(PlannedBatch(
                rows=tuple(tuple(where[id(m)] for m in row.examples) for row in chunk),
                length=self.bucket(max(row.length for row in chunk)),
                num_samples=len(items), num_tokens=sum(len(m) for m in items),
                num_tiles=sum(m.num_tiles for m in items)))
        return batches

    def bucket(self, longest: int) -> int:
        """The shortest allowed batch length that holds the longest row."""
        return next((b for b in self.buckets if b >= longest), self.seq_len)
