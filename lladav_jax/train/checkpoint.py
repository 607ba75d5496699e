"""Training checkpoints: Orbax, asynchronous, every N steps, the last K kept.

    WORKDIR/config.json, tokenizer.json   the model config and tokenizer (a model directory's)
    WORKDIR/checkpoints/STEP/params       all parameters (the model-directory format)
                            /opt_state    the optimizer state of the trained parameters
                            /meta         step, RNG, counters (JSON: `Bookkeeping`), and
                                          the checksum of every array saved (`integrity`)
                            /data         the Grain iterator state of every process (JSON)

So `--ckpt WORKDIR` (or a step directory) works wherever a model directory does. Restoring
takes abstract targets with shardings: a checkpoint restores onto any mesh.

A state with NaN or inf in its parameters or optimizer state is never saved (so it never
rotates a good checkpoint away), and a restore verifies the checksums and finiteness of what it
read: a checkpoint that fails is named, and the one before it used (`restore_latest`).

SIGTERM (a TPU preemption notice) and Ctrl-C (SIGINT) are recorded by `Preemption`; the loop
then saves at once (`Checkpoints.save_now`) at the next step boundary and stops. A second
Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import pathlib
import signal
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from lladav_jax import paths
from lladav_jax.checkpoints.modeldir import CHECKPOINTS_DIR
from lladav_jax.train import integrity
from lladav_jax.train.bookkeeping import NONFINITE_CAUSES, Bookkeeping
from lladav_jax.train.step import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint of the workdir that does not restore."""


class NonFiniteStateError(RuntimeError):
    """The state to be saved holds NaN or inf: it is not saved."""


def _is_read_noise(exc: BaseException | None) -> bool:
    """An error of a TensorStore read that outlived a failed restore."""
    text = str(exc)
    return text == "Event loop is closed" or text.startswith(
        "Encountered error while reading array index")


def _quiet_reads_of_failed_restores() -> None:
    """After a restore fails (its failure named already), the reads still in flight finish on
    Orbax's closed event loop and each is reported as an unraisable exception or an asyncio
    "exception was never retrieved": dozens of tracebacks that say nothing new. From then on,
    those reports, and only those, are dropped."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_read_noise(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not (record.exc_info and _is_read_noise(record.exc_info[1])))


_quieted = False


def _why(e: BaseException) -> str:
    """One line on why a restore failed: the innermost cause (TensorStore's names the file and
    the array; the exceptions Orbax wraps it in dump the whole storage spec)."""
    inner, seen = e, 0
    while (inner.__cause__ or inner.__context__) is not None and seen < 10:
        inner, seen = inner.__cause__ or inner.__context__, seen + 1
    first = (str(inner).strip().splitlines() or [""])[0][:300]
    return f"{type(inner).__name__}: {first}"


class Checkpoints:
    """The workdir's checkpoints: saved every `every` steps (and on demand), the last `keep`
    kept, written in the background if `asynchronous`."""

    def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int, asynchronous: bool):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, create=True,
            enable_async_checkpointing=asynchronous,
        )
        self.manager = ocp.CheckpointManager(
            paths.as_path(workdir) / CHECKPOINTS_DIR,  # Orbax writes gs:// itself
            options=options,
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, book: Bookkeeping,
             data_iterator: Any, *, force: bool = False) -> bool:
        """Saves (in the background) if `step` is due or `force`; True if a save started.
        Raises NonFiniteStateError, saving nothing, if the state holds NaN or inf."""
        if not (force or self.manager.should_save(step)):
            return False
        checksums, nonfinite = integrity.summarize({"params": params, "opt_state": opt_state})
        if nonfinite:
            kept = ", ".join(str(s) for s in self.manager.all_steps()) or "none"
            raise NonFiniteStateError(
                f"step {step} was not saved: NaN or inf in {integrity.listed(nonfinite)}; "
                f"the checkpoints kept (steps {kept}) are untouched. {NONFINITE_CAUSES}")
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({**book.to_json(), "checksums": checksums}),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        return self.manager.save(step, args=args, force=force)

    def save_now(self, step: int, state: TrainState, params: Any, book: Bookkeeping,
                 carry: list[dict], data_iterator: Any) -> None:
        """Saves the run at `step` whether due or not: `book` brought to `step` (with the
        state's RNG key and `carry`, the unlogged window as host values) goes with it."""
        book.step, book.pending = step, carry
        book.rng = np.asarray(jax.random.key_data(state.rng)).tolist()
        self.save(step, params, state.opt_state, book, data_iterator, force=True)

    def restore(self, step: int, params_target: Any, opt_target: Any,
                data_iterator: Any) -> tuple[Any, Any, Bookkeeping]:
        """(params, opt_state, bookkeeping) of `step`, placed per the abstract targets'
        shardings (`sharding.abstract_with_shardings`); the data iterator is set to where it
        was. Raises CheckpointError if what was read differs from what was saved (checksums)
        or holds NaN or inf."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target),
            opt_state=ocp.args.StandardRestore(opt_target),
            meta=ocp.args.JsonRestore(),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        checksums, nonfinite = integrity.summarize({"params": out.params,
                                                    "opt_state": out.opt_state})
        # Checkpoints written before checksums existed have none: finiteness is still checked.
        damaged = integrity.mismatches(out.meta.get("checksums", checksums), checksums)
        if damaged:
            raise CheckpointError(f"{len(damaged)} arrays differ from what was saved "
                                  f"(checksums): {integrity.listed(damaged)}; its files are "
                                  "damaged")
        if nonfinite:
            raise CheckpointError(f"NaN or inf in {integrity.listed(nonfinite)}")
        return out.params, out.opt_state, Bookkeeping.from_json(out.meta)

    def restore_latest(self, params_target: Any, opt_target: Any, data_iterator: Any, *,
                       fallback: bool) -> tuple[int, tuple[Any, Any, Bookkeeping]] | None:
        """(step, `restore`'s result) of the latest checkpoint that restores; None if there is
        no checkpoint. A checkpoint that does not restore (a missing or damaged file) is named;
        with `fallback`, the one before is tried and the bad ones newer than the one restored
        are moved aside (`bad-STEP`: kept, and out of the way of the steps the run repeats);
        without, or when none restores, a CheckpointError says what to do."""
        bad: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, params_target, opt_target, data_iterator)
            except Exception as e:  # any failure: named, then the one before
                _quiet_reads_of_failed_restores()
                bad.append((step, _why(e)))
                print(f"checkpoint {self.manager.directory / str(step)} does not restore: "
                      f"{bad[-1][1]}", file=sys.stderr)
                if not fallback:
                    raise CheckpointError(
                        f"checkpoint {self.manager.directory / str(step)} does not restore "
                        f"({bad[-1][1]}); move it aside to resume from the one before, or "
                        "set --config.train.on_bad_checkpoint=fallback") from e
                continue
            for b, _ in bad:
                aside = self._aside(b)
                (self.manager.directory / str(b)).rename(aside)
                print(f"moved the checkpoint of step {b} to {aside}; resuming from step {step}",
                      file=sys.stderr)
            if bad:
                self.manager.reload()
            return step, restored
        if bad:
            raise CheckpointError(
                f"no checkpoint in {self.manager.directory} restores: "
                + "; ".join(f"step {b} ({why})" for b, why in bad))
        return None

    def _aside(self, step: int) -> Any:
        """bad-STEP, or bad-STEP-N if the step went bad before (a rerun repeats its steps)."""
        name, n = f"bad-{step}", 0
        while (self.manager.directory / name).exists():
            n += 1
            name = f"bad-{step}-{n}"
        return self.manager.directory / name

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class Preemption:
    """Records SIGTERM and Ctrl-C (SIGINT); the loop checkpoints and stops at the next step
    where the processes agree on it. A Ctrl-C after either stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None  # the signal's name, once one came
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested is not None:  # already stopping
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            if signum == signal.SIGINT:
                print("\nCtrl-C: checkpointing at the end of this step, then stopping; "
                      "Ctrl-C again stops at once (the steps since the last checkpoint are "
                      "then lost)", file=sys.stderr, flush=True)

    def agreed(self, sync_point: bool) -> bool:
        """Whether any process was told to stop; every process must stop at the same step.

        One process: the flag, at every step. Several: agreeing takes a collective, and a
        collective queues behind the steps already dispatched, so asking at every step would
        make each host wait for its chips every step and lose asynchronous dispatch. So the
        processes ask only at `sync_point`s, steps where the loop waits anyway (logging,
        checkpoints) or every `train.preemption_check_every` steps: every process calls
        this with the same `sync_point` at the same step. Set the interval so that it
        takes well under the notice a preemption gives (about 30 s on Compute Engine)."""
        if jax.process_count() == 1:
            return self.requested is not None
        if not sync_point:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested is not None]))
        return bool(np.any(flags))

    def restore(self) -> None:
        """Puts back the handlers there were before."""
        for s, previous in self._previous.items():
            signal.signal(s, previous)
