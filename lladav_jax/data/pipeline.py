"""The Grain input pipeline: raw samples -> fixed-shape batches, deterministic and resumable.

    source -> shuffle (per epoch) -> repeat -> windows of W samples
      -> [worker processes] measure every sample of the window (no pixels) -> plan its rows
         and batches (`data/plan.py`) -> add pixels to the samples of this process's rows only
         -> collate this process's rows of each batch
      -> [this process] flatten windows into batches, count skips, abort on too many

Every process reads the whole window and plans it alike, but decodes only the images of its
own rows: the global batch, its length and the number of batches do not depend on the process
count (N processes train exactly as one), and a host of a 64-host pod decodes 1/64 of the
images. Measuring is cheap (text, image headers); decoding, resizing and tiling are the cost.

Every window is a pure function of its index, so the iterator state is just "which window, which
batch of it" (plus skip tallies): restoring it gives exactly the batches of an uninterrupted run.
Length grouping and packing happen within a window, so a larger window wastes less padding.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import signal
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import numpy as np
from absl import flags

from lladav_jax.data import shared_memory
from lladav_jax.data.example import (
    BATCH_KEYS,
    SKIP_REASONS,
    Example,
    Measured,
    RawSample,
    Skip,
)
from lladav_jax.data.layout import collate_visual
from lladav_jax.data.plan import Planner, Row, length_buckets

MAX_NAMED = 5  # skipped samples named in an abort message


class Featurize(Protocol):
    """The two steps of `Featurizer`: `measure` (no pixels) and `add_pixels`."""

    def measure(self, raw: RawSample) -> Measured | Skip: ...

    def add_pixels(self, measured: Measured, raw: RawSample) -> Example | Skip: ...


class DataQualityError(RuntimeError):
    """Too large a fraction of the samples was skipped: the data, not the model, needs a look."""


@dataclasses.dataclass(frozen=True)
class Padding:
    """The planned place of a sample whose pixels failed: `length` padding tokens."""

    length: int

    def __len__(self) -> int:
        return self.length


def collate(rows: Sequence[Row], batch_size: int, seq_len: int, cfg: Any, pad_id: int) -> dict:
    """Rows -> the fixed-shape batch of `BATCH_KEYS` (`turn_ids` for a model with the
    conversation mask only); missing rows and `Padding` are padding
    (a sample after a `Padding` keeps its planned place and segment id)."""
    tokens = np.full((batch_size, seq_len), pad_id, np.int32)
    targets = np.zeros((batch_size, seq_len), bool)
    positions = np.zeros((batch_size, seq_len), np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    turn_ids = np.zeros((batch_size, seq_len), np.int32)
    images: list[list[tuple[Any, int]]] = [[] for _ in range(batch_size)]
    for i, row in enumerate(rows):
        at = 0
        for seg, ex in enumerate(row.examples, start=1):
            n = len(ex)
            if not isinstance(ex, Padding):
                tokens[i, at : at + n] = ex.tokens
                targets[i, at : at + n] = ex.targets
                positions[i, at : at + n] = np.arange(n)
                segment_ids[i, at : at + n] = seg
                turn_ids[i, at : at + n] = ex.turn_ids
                images[i].extend((img, at + s) for img, s in zip(ex.images, ex.image_starts))
            at += n
    batch = dict(tokens=tokens, targets=targets, positions=positions, segment_ids=segment_ids)
    if getattr(cfg, "attention_mask", "bidirectional") == "conversation":
        # Only a model with the conversation mask reads them (a compiled step drops an
        # unused argument, and a plan counting them would overstate the batch).
        batch["turn_ids"] = turn_ids
    batch.update(collate_visual(images, cfg, seq_len))
    assert set(batch) <= set(BATCH_KEYS)
    return batch


def _named(skip: Skip) -> str:
    return f"{skip.sample_id} ({skip.reason}: {skip.detail})"


@dataclasses.dataclass(frozen=True)
class WindowToBatches:
    """One window of sample indices -> this process's rows of its batches, and skip counts.

    `skips`: samples the plan left out (every process finds the same). `local_skips`: samples
    of this process's rows whose pixels failed (a header that reads, data that does not);
    their places stay padding, so the batch is still the planned one. `featurized`: samples
    this process added pixels to."""

    source: Any  # random access; an optional `header(i)` spares reading the pixels to measure
    featurizer: Featurize
    planner: Planner
    cfg: Any  # model config: image sizes and fixed shapes
    pad_id: int
    rows: tuple[int, ...] | None = None  # this process's rows of each batch (None: all)

    def __call__(self, index: int, indices: Sequence[int]) -> dict:
        # A header spares reading (for synthetic data: drawing) the samples of others' rows;
        # one process holding every row reads each sample once, in full.
        header = getattr(self.source, "header", None) if self.rows is not None else None
        raws = [header(i) if header else self.source[i] for i in indices]
        measures: list[Measured | None] = []
        skips, named = collections.Counter(), []
        for raw in raws:
            out = self.featurizer.measure(raw)
            if isinstance(out, Skip):
                skips[out.reason] += 1
                named.append(_named(out))
                out = None
            measures.append(out)
        plan = self.planner(index, measures)
        local, local_named, featurized = collections.Counter(), [], 0
        rows = self.rows if self.rows is not None else range(self.planner.batch_size)
        batches = []
        for planned in plan:
            mine = []
            for r in rows:
                placed = []
                for k in planned.rows[r] if r < len(planned.rows) else ():
                    full = self.source[indices[k]] if header else raws[k]
                    out = self.featurizer.add_pixels(measures[k], full)
                    featurized += 1
                    if isinstance(out, Skip):
                        local[out.reason] += 1
                        local_named.append(_named(out))
                        out = Padding(len(measures[k]))
                    placed.append(out)
                mine.append(Row(tuple(placed)))
            batch = collate(mine, len(mine), planned.length, self.cfg, self.pad_id)
            batch.update(num_samples=planned.num_samples, num_tokens=planned.num_tokens,
                         num_tiles=planned.num_tiles)
            batches.append(batch)
        return {"batches": batches, "seen": len(raws), "skips": dict(skips),
                "named": named[:MAX_NAMED], "local_skips": dict(local),
                "local_named": local_named[:MAX_NAMED], "featurized": featurized}


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
    """In each worker process: Ctrl-C reaches the terminal's whole process group, and the
    trainer answers it with a checkpoint, for which its workers must still be alive; they stop
    when the trainer closes the pipeline."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _FlattenIterator(grain.DatasetIterator):
    """Windows -> batches. Skip counts of a window ride on its first batch, or on the next batch
    if the window had none; every batch carries `skips` and `local_skips` (counts since the
    previous batch).

    The state is "window k, batch j" plus skip tallies and the count of samples featurized,
    never Grain's internals: a restore re-opens the windows from k (each a pure function of
    its index), so it works with any number of worker processes, the same or not.
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
        self._exhausted = False  # the data ran out: every later `next` stops too
        self._set_tallies({})

    def _set_tallies(self, state: dict) -> None:
        count = lambda key: collections.Counter(state.get(key, {}))
        self._pending, self._local_pending = count("pending"), count("local_pending")
        self._skipped, self._local_skipped = count("skipped"), count("local_skipped")
        self._seen, self.featurized = state.get("seen", 0), state.get("featurized", 0)
        self._named = list(state.get("named", []))

    def _open(self, k: int) -> None:
        self.close()
        if k >= len(self._windows):  # past the end (a finite data set): no workers to start
            self._upstream = iter(())
            return
        # An element is a whole window: Grain's default read-ahead (16 threads, 500 elements)
        # would featurize dozens at once. One thread makes up to two windows ahead of the
        # step (with 0 workers, in this process); parallelism comes from worker processes.
        it = self._windows[k:].to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        if self._workers > 0:
            # Grain's worker processes read absl flags; programs that never parse them (ours,
            # notebooks) would fail there. Defaults are what we want.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers),
                                worker_init_fn=_ignore_ctrl_c)
            if not self._closes_at_exit:
                shared_memory.close_before_exit(self)
                self._closes_at_exit = True
        self._upstream = iter(it)

    def _fetch(self) -> dict | None:
        """The next window from upstream, or None (and exhausted) when there is none."""
        try:
            return shared_memory.unlink_on_arrival(next(self._upstream))
        except StopIteration:
            self._exhausted = True
            return None

    def _load(self) -> None:
        if self._upstream is None:
            self._open(self._k)
        elif self._window is not None:
            self._k += 1
        # At the end, window k is "the next one to load": a state saved now restores to an
        # iterator that stops at once.
        self._window, self._next = self._fetch(), 0
        if self._window is None:
            raise StopIteration
        w = self._window
        self._pending.update(w["skips"])
        self._local_pending.update(w["local_skips"])
        self._seen += w["seen"]
        self._skipped.update(w["skips"])
        self._local_skipped.update(w["local_skips"])
        self.featurized += w["featurized"]
        self._named = (self._named + w["named"] + w["local_named"])[:MAX_NAMED]
        self._check()

    def _skipped_estimate(self) -> int:
        """Samples skipped so far. With several processes this uses this process's counts: the
        plan's skips (the same everywhere) plus, for the samples the plan kept, the failure
        rate of those this process featurized (exact with one)."""
        planned = sum(self._skipped.values())
        failed = sum(self._local_skipped.values()) / max(self.featurized, 1)
        return round(planned + failed * (self._seen - planned))

    def _quality_error(self, skipped: int, why: str) -> DataQualityError:
        """The one message of a data abort: skipped of seen, why that is too many, the counts
        by reason and examples naming the samples and files at fault."""
        worst = ", ".join(f"{r} {n}" for r, n in
                          (self._skipped + self._local_skipped).most_common()) or "none"
        share = skipped / max(self._seen, 1)
        return DataQualityError(f"{skipped} of {self._seen} samples skipped ({share:.1%}{why}): "
                                f"{worst}; e.g. " + ("; ".join(self._named) or "none named"))

    def _check(self) -> None:
        """Aborts when the skipped share passes the limit (once `min_seen` samples were seen)."""
        skipped = self._skipped_estimate()
        if self._seen >= self._min_seen and skipped > self._max_skip_fraction * self._seen:
            raise self._quality_error(
                skipped, f" > max_skip_fraction {self._max_skip_fraction:.1%}")

    def check_complete(self) -> None:
        """For the caller once `next` raised StopIteration: raises `DataQualityError` when the
        data ran out badly, else returns. Bad: no sample seen at all, no sample usable, or
        more than `max_skip_fraction` of them skipped, however few were seen (the data was
        seen whole, so the share is final; `min_seen_for_abort` only guards early guesses)."""
        skipped = self._skipped_estimate()
        if self._seen == 0:
            raise DataQualityError("the data ran out before any sample was seen: is the "
                                   "source empty?")
        if skipped >= self._seen:
            raise self._quality_error(skipped, "; the data ran out with no sample usable")
        if skipped > self._max_skip_fraction * self._seen:
            raise self._quality_error(
                skipped, f" > max_skip_fraction {self._max_skip_fraction:.1%}; the data ran "
                         f"out")

    def __next__(self) -> dict:
        if self._exhausted:
            raise StopIteration
        while self._window is None or self._next >= len(self._window["batches"]):
            self._load()
        batch = dict(self._window["batches"][self._next])
        self._next += 1
        batch["skips"] = {r: self._pending.get(r, 0) for r in SKIP_REASONS}
        batch["local_skips"] = {r: self._local_pending.get(r, 0) for r in SKIP_REASONS}
        self._pending.clear()
        self._local_pending.clear()
        return batch

    def get_state(self) -> dict:
        return {
            "window": self._k,
            "loaded": self._window is not None,
            "next": self._next,
            # Counts of the window in hand already went into the totals: keep them apart.
            "pending": dict(self._pending),
            "local_pending": dict(self._local_pending),
            "seen": self._seen,
            "skipped": dict(self._skipped),
            "local_skipped": dict(self._local_skipped),
            "featurized": self.featurized,  # samples this process added pixels to
            "named": list(self._named),
        }

    def set_state(self, state: dict) -> None:
        self._k, self._next = state["window"], state["next"]
        self._set_tallies(state)  # (a state saved before local counts existed has none)
        self._exhausted = False
        self._open(self._k)
        # Recompute the window in hand (pure), without counting it again. A window past the
        # end (a state saved as the data ran out) leaves an iterator that stops at once.
        self._window = self._fetch() if state["loaded"] else None

    def close(self) -> None:
        """Stops worker processes and drops the window held and those read ahead, whose
        shared memory is released before this returns (`shared_memory`)."""
        self._window = None
        upstream, self._upstream = self._upstream, None
        if upstream is not None and hasattr(upstream, "close"):
            upstream.close()
            del upstream  # with it, the windows Grain read ahead
            # ... except those Grain's interleave iterator still holds in reference cycles
            # (its read-ahead of a stopped worker): freed only by a collection, and freed at
            # exit they are never unlinked (the leak warning after a stopped run).
            gc.collect()
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
    featurizer: Featurize,
    cfg: Any,
    data: Any,
    *,
    pad_id: int,
    rows: Sequence[int] | None = None,
) -> grain.IterDataset:
    """The training input pipeline of one process: its `rows` of every global batch.

    cfg: the model config. data: `seq_len`, `batch_size` (rows of the global batch), `seed`,
    `num_epochs` (None = forever), `window` (samples planned together), `pack`,
    `group_by_length`, `length_buckets` (batch lengths allowed with group_by_length; each is
    one compiled shape), `num_workers` (0 = in this process), `max_skip_fraction`,
    `min_seen_for_abort`. rows: this process's rows of each batch, in the order its batch
    holds them (None: all, one process); every process reads and plans all samples, and adds
    pixels only to those of its rows.
    """
    if rows is not None:
        rows = tuple(int(r) for r in rows)
        if len(set(rows)) != len(rows) or not all(0 <= r < data.batch_size for r in rows):
            raise ValueError(f"rows {rows} are not distinct rows of a {data.batch_size}-row "
                             "batch")
    planner = Planner(seq_len=data.seq_len, batch_size=data.batch_size, pack=data.pack,
                      group_by_length=data.group_by_length, seed=data.seed, image_cfg=cfg.image,
                      buckets=length_buckets(data) if data.group_by_length else ())
    to_batches = WindowToBatches(source=source, featurizer=featurizer, planner=planner, cfg=cfg,
                                 pad_id=pad_id, rows=rows)
    # Windows of source indices: the samples are read inside the window's work (a worker).
    ds = grain.MapDataset.range(len(source)).shuffle(seed=data.seed).repeat(data.num_epochs)
    windows = ds.batch(data.window, batch_fn=list).map_with_index(to_batches)
    return _Flatten(windows, data.num_workers, data.max_skip_fraction, data.min_seen_for_abort)


def padding_fraction(batches: Sequence[dict]) -> float:
    """Share of token positions that are padding (segment 0)."""
    total = sum(b["segment_ids"].size for b in batches)
    return sum(int((b["segment_ids"] == 0).sum()) for b in batches) / max(total, 1)
