"""The run's bookkeeping and its logging window.

`Bookkeeping` is what a checkpoint stores besides the arrays (its `meta` item, JSON): the
step, the RNG key, the non-finite step counts, the samples skipped by reason, and the steps
trained since the last metrics row. `LogWindow` gathers those per-step metrics and turns them
into one row of metrics.jsonl; a window a checkpoint cut in two is saved with it (host
values), so a resumed run writes the same rows as an uninterrupted one.

Where the time went (goodput): each row splits the window's wall time into waiting for data
(the time in `next()` of the input pipeline after the chips had finished every step
dispatched, `StepClock`: the host dispatches ahead, so a wait while the chips still work costs
nothing), writing checkpoints, validation, and the rest, the steps; `goodput` is the steps'
share. MFU counts real work (non-padding tokens, each attending to its own sample, and real
image tiles); `mfu_padded` what the chips computed.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from lladav_jax.data.example import SKIP_REASONS

TIMERS = ("data_wait_s", "checkpoint_s", "eval_s")  # the window's time outside the steps
INPUT_BOUND = 0.1  # a window waiting for data more than this share of its time is input-bound


class StepClock:
    """When the chips finished the last dispatched step, seen by a thread that waits for each
    step's result (the loop never does between logging steps)."""

    def __init__(self):
        self._steps: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running, self._done_at = 0, -float("inf")
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def dispatched(self, result: Any) -> None:
        """A step was dispatched; `result` is one of its outputs."""
        with self._lock:
            self._running += 1
        self._steps.put(result)

    def _watch(self) -> None:
        while (result := self._steps.get()) is not None:
            jax.block_until_ready(result)
            with self._lock:
                self._running -= 1
                self._done_at = time.perf_counter()

    def idle_since(self) -> float | None:
        """perf_counter time since which the chips have had nothing to do; None if busy."""
        with self._lock:
            return self._done_at if self._running == 0 else None

    def close(self) -> None:
        self._steps.put(None)
        self._thread.join()


class RowWriter(Protocol):
    def write(self, row: dict) -> None: ...


# What makes NaN or inf in a run, most likely first: said by every non-finite stop.
NONFINITE_CAUSES = (
    "Likely causes, most likely first: the learning rate (lower optim.lr or raise "
    "optim.warmup_ratio); the data (broken or extreme samples in these steps' batches); "
    "damaged weights at the start (the init_from model directory, or a checkpoint written "
    "before checksums were: restores check both for NaN); overflow in bfloat16 (try "
    "model.dtype=float32)."
)


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
    # Skips this process alone saw since the last `settle` (never saved: settled first).
    local_skips: collections.Counter = dataclasses.field(default_factory=collections.Counter)

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

    def count_skips(self, skips: Mapping[str, Any], *, local: bool = False) -> None:
        """Adds a batch's skipped samples (by reason): those every process counts alike, or
        (`local`) those only this process saw, which `settle` adds up over processes."""
        counter = self.local_skips if local else self.skips
        for reason, n in skips.items():
            counter[reason] += int(n)

    def settle(self) -> None:
        """Adds every process's local skips to `skips`: a collective on several processes,
        so every process calls it at the same step (logging and checkpoint steps)."""
        counts = np.array([self.local_skips.get(r, 0) for r in SKIP_REASONS], np.int64)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
        for reason, n in zip(SKIP_REASONS, counts):
            if n:
                self.skips[reason] += int(n)
        self.local_skips.clear()

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
                    f"skipped. {NONFINITE_CAUSES} To let the run go on longer, raise "
                    "train.max_nonfinite_in_a_row.")


class LogWindow:
    """The steps since the last metrics row (starting with those a checkpoint carried over),
    and the row they make: losses and gradient norms averaged over the finite steps,
    throughput, MFU and where the window's wall time went, the run's skip counts."""

    def __init__(self, book: Bookkeeping, writers: Sequence[RowWriter],
                 schedules: Mapping[str, Any],
                 *, peak_flops: float, n_devices: int, max_nonfinite_in_a_row: int,
                 progress: Any = None):
        self.book = book
        self.writers = writers  # metrics.jsonl and TensorBoard; W&B if asked for
        self.schedules = schedules
        self.peak_flops, self.n_devices = peak_flops, n_devices
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.progress = progress  # a tqdm bar, shown the last row's loss
        self.steps: list[dict] = list(book.pending)
        self._resume_step = book.step
        self._started = time.perf_counter()
        self._spent = dict.fromkeys(TIMERS, 0.0)
        self._input_bound = False

    def add(self, step_metrics: Mapping[str, Any], *, samples: int, tokens: int,
            flops: float, flops_padded: float) -> None:
        """One step: its metrics (device arrays) and its global batch's samples, non-padding
        tokens, and model FLOPs of the real work and as computed (padding included)."""
        self.steps.append({"m": step_metrics, "samples": samples, "tokens": tokens,
                           "flops": flops, "flops_padded": flops_padded})

    def spend(self, timer: str, seconds: float) -> None:
        """Time of the window spent outside the steps (one of `TIMERS`)."""
        self._spent[timer] += seconds

    def carry(self) -> list[dict]:
        """The window's steps as host values (JSON), to save with a checkpoint."""
        self.steps = [{**s, "m": {k: float(v) for k, v in jax.device_get(s["m"]).items()}}
                      for s in self.steps]
        return self.steps

    def write_row(self, step: int, extra: Mapping[str, Any] | None = None) -> dict | None:
        """Writes the window's row as the row of `step` (nothing if the window is empty), with
        `extra` values (validation), then counts its non-finite steps (after the row: the
        step that ends the run is on record too) and starts the next window. Every process
        calls it at the same steps (`Bookkeeping.settle` is a collective)."""
        if not self.steps:
            return None
        steps = self.carry()  # waits for the window's last step
        elapsed = time.perf_counter() - self._started
        self.book.settle()
        # Throughput of a window that began before a resume mixes two processes: not reported.
        resumed = step - len(steps) < self._resume_step
        row = self._row(step, steps, None if resumed else elapsed)
        row.update(extra or {})
        for writer in self.writers:
            writer.write(row)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{row['loss']:.4f}")
        self._warn_if_input_bound(row)
        self.book.count_nonfinite(steps, self.max_nonfinite_in_a_row)
        self.steps, self._started = [], time.perf_counter()
        self._spent = dict.fromkeys(TIMERS, 0.0)
        return row

    def _row(self, step: int, steps: list[dict], elapsed: float | None) -> dict:
        ms = [s["m"] for s in steps]
        ok = [m for m in ms if not m["skipped"]] or ms
        lrs = {p: float(s(step - 1)) for p, s in self.schedules.items()}
        tokens = sum(s["tokens"] for s in steps)  # global batches: every process sees them all
        peak = self.peak_flops * self.n_devices
        timed = elapsed is not None
        row = {
            "step": step,
            "loss": float(np.mean([m["loss"] for m in ok])),
            "learning_rate": lrs.get("llm", max(lrs.values())),
            "grad_norm": float(np.mean([m["grad_norm"] for m in ok])),
            "tokens_per_second": tokens / elapsed if timed else None,
            "mfu": sum(s["flops"] for s in steps) / elapsed / peak if timed else None,
            "mfu_padded": (sum(s.get("flops_padded", s["flops"]) for s in steps) / elapsed
                           / peak if timed else None),
            "step_s": elapsed / len(steps) if timed else None,
            **{k: v if timed else None for k, v in self._spent.items()},
            "goodput": 1 - sum(self._spent.values()) / elapsed if timed else None,
            "samples": int(sum(s["samples"] for s in steps)),
            "nonfinite_steps": int(sum(m["skipped"] for m in ms)),
        }
        row.update({f"lr_{p}": v for p, v in lrs.items()})
        row.update({f"skipped_{r}": int(self.book.skips.get(r, 0)) for r in SKIP_REASONS})
        return row

    def _warn_if_input_bound(self, row: dict) -> None:
        """Says so when the run becomes input-bound (and again after it recovered)."""
        if row["step_s"] is None:
            return
        share = row["data_wait_s"] / (row["step_s"] * len(self.steps))
        bound = share > INPUT_BOUND
        if bound and not self._input_bound:
            print(f"\nwarning: input-bound at step {row['step']}: {share:.0%} of the last "
                  f"{len(self.steps)} steps' time waited for data (over "
                  f"{INPUT_BOUND:.0%}); more data.num_workers, a smaller data.window, or "
                  "faster storage would feed the step", file=sys.stderr)
        self._input_bound = bound
