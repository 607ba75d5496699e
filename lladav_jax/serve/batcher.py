"""Requests decoded together: a bounded queue, fixed batch shapes compiled at start, one worker.

    batcher = Batcher(model, defaults, Shapes.for_model(model, defaults, max_batch=32))
    batcher.warm_up()                        # compiles every (rows, prompt length) shape
    batcher.start()
    batcher.submit(Job(prompt, options, seed, deliver))   # QueueFull when the queue is full

Requests with the same sampler options that arrive within `window_s` of the oldest waiting
one, each within `gap_s` of the one before or while others are still being read (`arriving`),
or that fill `max_batch`, are one batch, padded to the smallest compiled number of rows and
prompt length that hold them, so no request compiles anything when it uses the warmed-up
options (`compiles_after_warm_up` counts XLA compiles, from JAX's monitoring events). Every
row draws its random numbers from its own request's seed (`unmasking.row_keys`) and prompts are
left-padded with positions counted from their first token: an answer is the same in any batch.

A row whose answer has ended is delivered at the end of that block, not the batch's. A job
cancelled or past its deadline while it waits never enters a batch; one cancelled during its
batch is decoded to the end of the batch (one compiled program) and dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from lladav_jax.diffusion.options import SamplerOptions
from lladav_jax.inference.api import PROMPT_BUCKET, BlockDone, Model, PreparedPrompt

log = logging.getLogger("lladav.serve")

_COMPILES = [0]  # XLA compiles in this process


def _count_compile(event: str, *_args, **_kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compiles() -> int:
    """XLA compiles in this process since this module was imported."""
    return _COMPILES[0]


class QueueFull(Exception):
    """The queue holds `queue_size` requests: the server answers 429."""


@dataclasses.dataclass
class Job:
    """One request's row. `deliver(kind, payload)` is called from the worker thread:
    ("block", BlockDone) after each block, then once ("done", (text, ids, finish_reason)) or
    ("error", (status, message))."""

    prompt: PreparedPrompt
    options: SamplerOptions
    seed: int
    deliver: Callable[[str, Any], None]
    deadline: float = float("inf")  # time.monotonic() after which it is answered 504
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the client's side when it goes away
    finished: bool = False

    def finish(self, kind: str, payload: Any) -> None:
        if not self.finished:
            self.finished = True
            self.deliver(kind, payload)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The batch shapes compiled at start: numbers of rows and prompt lengths."""

    rows: tuple[int, ...]
    prompt_lengths: tuple[int, ...]

    @classmethod
    def for_model(cls, model: Model, options: SamplerOptions, max_batch: int = 32,
                  rows: Sequence[int] | None = None,
                  prompt_lengths: Sequence[int] | None = None) -> Shapes:
        """Defaults: rows 1, 4, 16, ... and max_batch; prompt lengths that hold a one-image
        prompt with a 64-token question, and the longest prompt the model takes beside
        `options.gen_length`."""
        if rows is None:
            rows = [r for r in (4**k for k in range(8)) if r < max_batch] + [max_batch]
        if prompt_lengths is None:
            base = len(model.prepare(None, "", options).tokens)
            one_image = base + int(model.config.image.max_visual_tokens) + 64
            longest = (model.max_positions - options.gen_length) // PROMPT_BUCKET * PROMPT_BUCKET
            prompt_lengths = sorted({min(_round_up(one_image), longest), longest})
        if not rows or min(rows) < 1 or max(rows) != max_batch:
            raise ValueError(f"batch rows {list(rows)}: each >= 1, the largest max_batch "
                             f"{max_batch}")
        if not prompt_lengths or min(prompt_lengths) < 1:
            raise ValueError(f"prompt lengths {list(prompt_lengths)}: each >= 1")
        return cls(tuple(sorted(set(rows))), tuple(sorted(set(prompt_lengths))))

    def fit(self, n: int, longest: int) -> tuple[int, int] | None:
        """(rows, prompt length) for n prompts whose longest has `longest` tokens, or None."""
        length = next((p for p in self.prompt_lengths if p >= longest), None)
        return None if length is None else (next(r for r in self.rows if r >= n), length)


def _round_up(n: int) -> int:
    return -(-n // PROMPT_BUCKET) * PROMPT_BUCKET


class Batcher:
    """The queue and the worker thread that decodes it (module docstring)."""

    def __init__(self, model: Model, options: SamplerOptions, shapes: Shapes, *,
                 window_s: float = 0.05, gap_s: float = 0.005, queue_size: int = 256):
        self.model, self.options, self.shapes = model, options, shapes
        self.window_s, self.gap_s, self.queue_size = window_s, gap_s, queue_size
        self._queue: list[Job] = []
        self._arriving = 0  # requests being read and prepared: about to join (`arriving`)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.warm_compiles: int | None = None  # compiles() after warm_up
        self.batches = self.rows_decoded = 0
        self.dropped = 0  # jobs cancelled or timed out before their batch

    # -- the client's side -----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull if `queue_size` are waiting. A prompt longer than every
        compiled length is decoded at its own (one compile, counted)."""
        with self._wake:
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue holds {self.queue_size} requests; try again later")
            self._queue.append(job)
            self._wake.notify()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request's reading, preparing and `submit`: while any request is arriving,
        a batch is not closed by the gap (only by the window or when full), so a burst whose
        requests are still being read joins one batch."""
        with self._wake:
            self._arriving += 1
        try:
            yield
        finally:
            with self._wake:
                self._arriving -= 1
                self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def compiles_after_warm_up(self) -> int | None:
        return None if self.warm_compiles is None else compiles() - self.warm_compiles

    # -- start and stop --------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Compile every shape for the default options; returns the seconds it took."""
        t0 = time.perf_counter()
        image = Image.new("RGB", (self.model.config.vision.image_size,) * 2)
        prompt = self.model.prepare(image, "warm-up", self.options)
        for length in self.shapes.prompt_lengths:
            if length < len(prompt.tokens):
                prompt = self.model.prepare(None, "warm-up", self.options)
            for rows in self.shapes.rows:
                self.model.decode([prompt], self.options, keys([0] * rows), rows=rows,
                                  prompt_len=length, visual=True, on_block=lambda _: None)
                log.info("warm-up: compiled %d rows x %d prompt tokens", rows, length)
        self.warm_compiles = compiles()
        return time.perf_counter() - t0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="lladav-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        for job in self._queue:
            job.finish("error", (503, "the server is shutting down"))

    # -- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            try:
                self._decode(jobs)
            except Exception as e:  # a failure of one batch must not stop the server
                log.exception("batch of %d failed", len(jobs))
                for job in jobs:
                    job.finish("error", (500, f"decoding failed: {type(e).__name__}: {e}"))

    def _next_batch(self) -> list[Job] | None:
        """The next batch: the oldest job and up to max_batch - 1 more with its options, once
        the batch is full, the window since the oldest arrived has passed, or no job has
        joined for `gap_s` and none is arriving (a lone request waits only that long; a burst
        keeps gathering)."""
        max_batch = self.shapes.rows[-1]
        with self._wake:
            while True:
                if self._stop:
                    return None
                self._drop_expired()
                if not self._queue:
                    self._wake.wait()
                    continue
                first = self._queue[0]
                mates = [j for j in self._queue if j.options == first.options][:max_batch]
                # Closed by the window, or earlier by a gap: nobody has joined for gap_s and
                # nobody is arriving.
                close = first.arrived + self.window_s
                if not self._arriving:
                    close = min(close, mates[-1].arrived + self.gap_s)
                wait = close - time.monotonic()
                if len(mates) < max_batch and wait > 0:
                    self._wake.wait(wait)
                    continue
                for job in mates:
                    self._queue.remove(job)
                return mates

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for job in list(self._queue):
            if job.cancelled or now > job.deadline:
                self._queue.remove(job)
                self.dropped += 1
                job.finish("error", (504, "the request timed out waiting for a batch"))

    def _decode(self, jobs: list[Job]) -> None:
        longest = max(len(j.prompt.tokens) for j in jobs)
        fit = self.shapes.fit(len(jobs), longest)
        rows, length = fit if fit is not None else (len(jobs), None)
        options = jobs[0].options

        def on_block(blocks: list[BlockDone]) -> None:
            for job, block in zip(jobs, blocks, strict=True):
                if job.finished or job.cancelled:
                    continue
                job.deliver("block", block)
                if block.done:  # the answer has ended: it leaves now
                    text, ids = self.model.answer(block.tokens)
                    job.finish("done", (text, ids, "stop"))

        seeds = [j.seed for j in jobs]
        results = self.model.decode([j.prompt for j in jobs], options,
                                    keys(seeds + seeds[:1] * (rows - len(jobs))), rows=rows,
                                    prompt_len=length,
                                    visual=True, on_block=on_block)
        self.batches += 1
        self.rows_decoded += len(jobs)
        for job, result in zip(jobs, results, strict=True):
            finish = "stop" if self.model.ended(result.tokens) else "length"
            job.finish("done", (result.text, result.ids, finish))


@jax.jit
def _keys(seeds: jax.Array) -> jax.Array:
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(seeds)


def keys(seeds: Sequence[int]) -> jax.Array:
    """One random key per row: seed s gives the key that `Model.generate(seed=s)` gives its
    only row (`unmasking.row_keys`), so a request answers as it would alone. One compiled call
    per number of rows (the warm-up's)."""
    return _keys(np.asarray(seeds, np.uint32))
