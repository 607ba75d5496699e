"""The run's bookkeeping and its logging window.

`Bookkeeping` is what a checkpoint stores besides the arrays (its `meta` item, JSON): the
step, the RNG key, the non-finite step counts, the samples skipped by reason, and the steps
trained since the last metrics row. `LogWindow` gathers those per-step metrics and turns them
into one row of metrics.jsonl; a window a checkpoint cut in two is saved with it (host
values), so a resumed run writes the same rows as an uninterrupted one.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lladav_jax.data.example import SKIP_REASONS
from lladav_jax.train.metrics import MetricsWriter


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


@dataclasses.dataclass
class Bookkeeping:
    """The run's counters as of the last checkpoint (or the start); the counts and skips are
    kept current while the run goes on."""

    step: int
    rng: list[int]  # jax.random.key_data of the train state's key
    nonfinite: int = 0  # logged steps with a non-finite loss or gradient
    nonfinite_in_a_row: int = 0  # ... of them since the last finite one
    skips: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    pending: list[dict] = dataclasses.field(default_factory=list)  # the unlogged window

    @classmethod
    def start(cls, seed: int) -> Bookkeeping:
        """Step 0 with the key of `seed`."""
        return cls(step=0, rng=np.asarray(jax.random.key_data(jax.random.key(seed))).tolist())

    def to_json(self) -> dict:
        """The checkpoint's `meta` item (copies: an asynchronous save writes it later)."""
        return {"step": self.step, "rng": list(self.rng), "nonfinite": self.nonfinite,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "skips": dict(self.skips),
                "pending": list(self.pending)}

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> Bookkeeping:
        return cls(step=meta["step"], rng=list(meta["rng"]), nonfinite=meta["nonfinite"],
                   nonfinite_in_a_row=meta["nonfinite_in_a_row"],
                   skips=collections.Counter(meta["skips"]), pending=list(meta["pending"]))

    def count_skips(self, skips: Mapping[str, Any]) -> None:
        """Adds a batch's skipped samples (by reason)."""
        for reason, n in skips.items():
            self.skips[reason] += int(n)

    def count_nonfinite(self, steps: list[dict], limit: int) -> None:
        """Counts the skipped (non-finite) steps among `steps`; raises NonFiniteLossError
        after `limit` in a row."""
        for s in steps:
            if not s["m"]["skipped"]:
                self.nonfinite_in_a_row = 0
                continue
            self.nonfinite_in_a_row += 1
            self.nonfinite += 1
            if self.nonfinite_in_a_row >= limit:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or "
                    f"gradient (the last loss was {s['m']['loss']}); their updates were "
                    "skipped. Lower the learning rate, check the data, or raise "
                    "train.max_nonfinite_in_a_row")


class LogWindow:
    """The steps since the last metrics row (starting with those a checkpoint carried over),
    and the row they make: losses and gradient norms averaged over the finite steps,
    throughput and MFU over the window's wall time, the run's skip counts."""

    def __init__(self, book: Bookkeeping, writer: MetricsWriter, schedules: Mapping[str, Any],
                 *, peak_flops: float, n_devices: int, max_nonfinite_in_a_row: int,
                 progress: Any = None):
        self.book = book
        self.writer = writer
        self.schedules = schedules
        self.peak_flops, self.n_devices = peak_flops, n_devices
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.progress = progress  # a tqdm bar, shown the last row's loss
        self.steps: list[dict] = list(book.pending)
        self._resume_step = book.step
        self._started = time.perf_counter()

    def add(self, step_metrics: Mapping[str, Any], *, samples: int, tokens: int,
            flops: float) -> None:
        """One step: its metrics (device arrays) and its global batch's samples, non-padding
        tokens and model FLOPs."""
        self.steps.append({"m": step_metrics, "samples": samples, "tokens": tokens,
                           "flops": flops})

    def carry(self) -> list[dict]:
        """The window's steps as host values (JSON), to save with a checkpoint."""
        self.steps = [{**s, "m": {k: float(v) for k, v in jax.device_get(s["m"]).items()}}
                      for s in self.steps]
        return self.steps

    def write_row(self, step: int) -> dict | None:
        """Writes the window's row as the row of `step` (nothing if the window is empty), then
        counts its non-finite steps (after the row: the step that ends the run is on record
        too) and starts the next window."""
        if not self.steps:
            return None
        steps = self.carry()
        elapsed = time.perf_counter() - self._started
        # Throughput of a window that began before a resume mixes two processes: not reported.
        resumed = step - len(steps) < self._resume_step
        row = self._row(step, steps, None if resumed else elapsed)
        self.writer.write(row)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{row['loss']:.4f}")
        self.book.count_nonfinite(steps, self.max_nonfinite_in_a_row)
        self.steps, self._started = [], time.perf_counter()
        return row

    def _row(self, step: int, steps: list[dict], elapsed: float | None) -> dict:
        ms = [s["m"] for s in steps]
        ok = [m for m in ms if not m["skipped"]] or ms
        lrs = {p: float(s(step - 1)) for p, s in self.schedules.items()}
        tokens = sum(s["tokens"] for s in steps)  # global batches: every process sees them all
        flops = sum(s["flops"] for s in steps)
        row = {
            "step": step,
            "loss": float(np.mean([m["loss"] for m in ok])),
            "learning_rate": lrs.get("llm", max(lrs.values())),
            "grad_norm": float(np.mean([m["grad_norm"] for m in ok])),
            "tokens_per_second": None if elapsed is None else tokens / elapsed,
            "mfu": None if elapsed is None else
            flops / elapsed / (self.peak_flops * self.n_devices),
            "samples": int(sum(s["samples"] for s in steps)),
            "nonfinite_steps": int(sum(m["skipped"] for m in ms)),
        }
        row.update({f"lr_{p}": v for p, v in lrs.items()})
        row.update({f"skipped_{r}": int(self.book.skips.get(r, 0)) for r in SKIP_REASONS})
        return row
