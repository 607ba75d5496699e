"""The Grain input pipeline: raw samples -> fixed-shape batches, deterministic and resumable.

    source -> shuffle (per epoch) -> this process's share -> repeat -> windows of W samples
      -> [worker processes] featurize each sample, pack or length-group the window into rows,
         cut the rows into batches
      -> [this process] flatten windows into batches, count skips, abort on too many

Every window is a pure function of its index, so the iterator state is just "which window, which
batch of it" (plus skip tallies): restoring it gives exactly the batches of an uninterrupted run.
Length grouping and packing happen within a window, so a larger window wastes less padding.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from lladav_jax.data import shared_memory
from lladav_jax.data.example import BATCH_KEYS, SKIP_REASONS, Example, RawSample, Skip
from lladav_jax.data.layout import collate_visual

Featurize = Callable[[RawSample], "Example | Skip"]
MAX_NAMED = 5  # skipped samples named in an abort message


class DataQualityError(RuntimeError):
    """Too large a fraction of the samples was skipped: the data, not the model, needs a look."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence of a batch: one example, or several packed ones."""

    examples: tuple[Example, ...]

    @property
    def length(self) -> int:
        return sum(len(e) for e in self.examples)


def _fits(row: list[Example], ex: Example, seq_len: int, image_cfg) -> bool:
    tiles = sum(i.tiles.shape[0] for e in (*row, ex) for i in e.images)
    tokens = sum(i.layout.num_tokens for e in (*row, ex) for i in e.images)
    return (
        sum(len(e) for e in row) + len(ex) <= seq_len
        and tiles <= image_cfg.max_tiles
        and tokens <= image_cfg.max_visual_tokens
    )


def pack_rows(examples: Sequence[Example], seq_len: int, image_cfg) -> list[Row]:
    """First-fit decreasing: longest first, each into the first row with room (tokens, tiles and
    visual tokens), so that short samples fill the gaps that long ones leave."""
    rows: list[list[Example]] = []
    for ex in sorted(examples, key=len, reverse=True):
        for row in rows:
            if _fits(row, ex, seq_len, image_cfg):
                row.append(ex)
                break
        else:
            rows.append([ex])
    return [Row(tuple(r)) for r in rows]


def group_rows(examples: Sequence[Example], by_length: bool) -> list[Row]:
    """One example per row; sorted by length so that a batch holds similar lengths."""
    order = sorted(examples, key=len) if by_length else list(examples)
    return [Row((e,)) for e in order]


def collate(rows: Sequence[Row], batch_size: int, seq_len: int, cfg, pad_id: int) -> dict:
    """Rows -> the fixed-shape batch of `BATCH_KEYS`; missing rows are all padding."""
    tokens = np.full((batch_size, seq_len), pad_id, np.int32)
    targets = np.zeros((batch_size, seq_len), bool)
    positions = np.zeros((batch_size, seq_len), np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    images: list[list[tuple[Any, int]]] = [[] for _ in range(batch_size)]
    for i, row in enumerate(rows):
        at = 0
        for seg, ex in enumerate(row.examples, start=1):
            n = len(ex)
            tokens[i, at : at + n] = ex.tokens
            targets[i, at : at + n] = ex.targets
            positions[i, at : at + n] = np.arange(n)
            segment_ids[i, at : at + n] = seg
            images[i].extend((img, at + s) for img, s in zip(ex.images, ex.image_starts))
            at += n
    batch = dict(tokens=tokens, targets=targets, positions=positions, segment_ids=segment_ids)
    batch.update(collate_visual(images, cfg, seq_len))
    assert set(batch) == set(BATCH_KEYS)
    return batch


@dataclasses.dataclass(frozen=True)
class WindowToBatches:
    """Featurizes one window of raw samples and returns its batches and skip counts."""

    featurize: Featurize
    cfg: Any  # model config: image sizes and fixed shapes
    seq_len: int
    batch_size: int
    pad_id: int
    pack: bool
    group_by_length: bool
    seed: int
    buckets: tuple[int, ...] = ()  # sequence lengths a batch may take (sorted; last = seq_len)

    def __call__(self, index: int, raws: Sequence[RawSample]) -> dict:
        examples, skips, named = [], collections.Counter(), []
        for raw in raws:
            out = self.featurize(raw)
            if isinstance(out, Skip):
                skips[out.reason] += 1
                if len(named) < MAX_NAMED:
                    named.append(f"{out.sample_id} ({out.reason}: {out.detail})")
            else:
                examples.append(out)
        if self.pack:
            rows = pack_rows(examples, self.seq_len, self.cfg.image)
        else:
            rows = group_rows(examples, self.group_by_length)
        chunks = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        # Sorted rows make batches ordered by length; shuffle the batches of the window.
        order = np.random.default_rng([self.seed, index]).permutation(len(chunks))
        batches = []
        for k in order:
            length = self.bucket(max(r.length for r in chunks[k]))
            batch = collate(chunks[k], self.batch_size, length, self.cfg, self.pad_id)
            batch["num_samples"] = np.int32(sum(len(r.examples) for r in chunks[k]))
            batches.append(batch)
        return {"batches": batches, "seen": len(raws), "skips": dict(skips), "named": named}

    def bucket(self, longest: int) -> int:
        """The shortest allowed batch length that holds the longest row."""
        return next((b for b in self.buckets if b >= longest), self.seq_len)


class _FlattenIterator(grain.DatasetIterator):
    """Windows -> batches. Skip counts of a window ride on its first batch, or on the next batch
    if the window had none; every batch carries `skips` (counts since the previous batch).

    The state is "window k, batch j" plus skip tallies, never Grain's internals: a restore
    re-opens the windows from k (each a pure function of its index), so it works with any
    number of worker processes, the same or not.
    """

    def __init__(self, windows: grain.MapDataset, workers: int, max_skip_fraction: float,
                 min_seen: int):
        super().__init__()
        self._windows, self._workers = windows, workers
        self._max_skip_fraction, self._min_seen = max_skip_fraction, min_seen
        self._upstream = None
        self._closes_at_exit = False
        self._k = 0  # index of the window in hand, or of the next one to load
        self._window: dict | None = None
        self._next = 0
        self._pending: collections.Counter = collections.Counter()
        self._seen = 0
        self._skipped: collections.Counter = collections.Counter()
        self._named: list[str] = []

    def _open(self, k: int) -> None:
        self.close()
        # An element is a whole window: Grain's default read-ahead (16 threads, 500 elements)
        # would featurize dozens at once. Parallelism comes from worker processes instead.
        it = self._windows[k:].to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        if self._workers > 0:
            # Grain's worker processes read absl flags; programs that never parse them (ours,
            # notebooks) would fail there. Defaults are what we want.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
            if not self._closes_at_exit:
                shared_memory.close_before_exit(self)
                self._closes_at_exit = True
        self._upstream = iter(it)

    def _load(self) -> None:
        if self._upstream is None:
            self._open(self._k)
        elif self._window is not None:
            self._k += 1
        self._window, self._next = shared_memory.unlink_on_arrival(next(self._upstream)), 0
        self._pending.update(self._window["skips"])
        self._seen += self._window["seen"]
        self._skipped.update(self._window["skips"])
        self._named = (self._named + self._window["named"])[:MAX_NAMED]
        self._check()

    def _check(self) -> None:
        skipped = sum(self._skipped.values())
        if self._seen >= self._min_seen and skipped > self._max_skip_fraction * self._seen:
            worst = ", ".join(f"{r} {n}" for r, n in self._skipped.most_common())
            raise DataQualityError(
                f"{skipped} of {self._seen} samples skipped ({skipped / self._seen:.1%} > "
                f"max_skip_fraction {self._max_skip_fraction:.1%}): {worst}; e.g. "
                + "; ".join(self._named)
            )

    def __next__(self) -> dict:
        while self._window is None or self._next >= len(self._window["batches"]):
            self._load()
        batch = dict(self._window["batches"][self._next])
        self._next += 1
        batch["skips"] = {r: np.int32(self._pending.get(r, 0)) for r in SKIP_REASONS}
        self._pending.clear()
        return batch

    def get_state(self) -> dict:
        return {
            "window": self._k,
            "loaded": self._window is not None,
            "next": self._next,
            # Counts of the window in hand already went into the totals: keep them apart.
            "pending": dict(self._pending),
            "seen": self._seen,
            "skipped": dict(self._skipped),
            "named": list(self._named),
        }

    def set_state(self, state: dict) -> None:
        self._k, self._next = state["window"], state["next"]
        self._pending = collections.Counter(state["pending"])
        self._seen, self._skipped = state["seen"], collections.Counter(state["skipped"])
        self._named = list(state["named"])
        self._open(self._k)
        # Recompute the window in hand (pure), without counting it again.
        self._window = (shared_memory.unlink_on_arrival(next(self._upstream))
                        if state["loaded"] else None)

    def close(self) -> None:
        """Stops worker processes and drops the window held and those read ahead, whose
        shared memory is released before this returns (`shared_memory`)."""
        self._window = None
        upstream, self._upstream = self._upstream, None
        if upstream is not None and hasattr(upstream, "close"):
            upstream.close()
            del upstream  # with it, the windows Grain read ahead
            shared_memory.flush_deletions()


class _Flatten(grain.IterDataset):
    def __init__(self, windows: grain.MapDataset, workers: int, max_skip_fraction: float,
                 min_seen: int):
        super().__init__(windows)
        self._args = (windows, workers, max_skip_fraction, min_seen)

    def __iter__(self) -> _FlattenIterator:
        return _FlattenIterator(*self._args)


def make_dataset(
    source: Sequence[RawSample],
    featurize: Featurize,
    cfg,
    data,
    *,
    pad_id: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The training input pipeline of one process.

    cfg: the model config. data: `seq_len`, `batch_size` (per process), `seed`, `num_epochs`
    (None = forever), `window` (samples featurized together), `pack`, `group_by_length`,
    `length_buckets` (batch lengths allowed with group_by_length; each is one compiled shape),
    `num_workers` (0 = in this process), `max_skip_fraction`, `min_seen_for_abort`.
    Process index/count default to JAX's: each process reads a disjoint share of every epoch.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(source).shuffle(seed=data.seed)
    ds = ds[process_index::process_count].repeat(data.num_epochs)
    to_batches = WindowToBatches(
        featurize=featurize, cfg=cfg, seq_len=data.seq_len, batch_size=data.batch_size,
        pad_id=pad_id, pack=data.pack, group_by_length=data.group_by_length, seed=data.seed,
        buckets=length_buckets(data) if data.group_by_length else (),
    )
    windows = ds.batch(data.window, batch_fn=list).map_with_index(to_batches)
    return _Flatten(windows, data.num_workers, data.max_skip_fraction, data.min_seen_for_abort)


def length_buckets(data) -> tuple[int, ...]:
    """Allowed batch lengths: `data.length_buckets`, or quarter, half and full seq_len."""
    buckets = data.get("length_buckets") or (data.seq_len // 4, data.seq_len // 2)
    if max(buckets) > data.seq_len:
        raise ValueError(f"length_buckets {buckets} exceed seq_len {data.seq_len}")
    return tuple(sorted({*buckets, data.seq_len}))


def padding_fraction(batches: Sequence[dict]) -> float:
    """Share of token positions that are padding (segment 0)."""
    total = sum(b["segment_ids"].size for b in batches)
    return sum(int((b["segment_ids"] == 0).sum()) for b in batches) / max(total, 1)
