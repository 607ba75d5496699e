"""Training checkpoints: Orbax, asynchronous, every N steps, the last K kept.

    WORKDIR/config.json, tokenizer.json   the model config and tokenizer (a model directory's)
    WORKDIR/checkpoints/STEP/params       all parameters (the model-directory format)
                            /opt_state    the optimizer state of the trained parameters
                            /meta         step, RNG, counters (JSON: `Bookkeeping`)
                            /data         the Grain iterator state of every process (JSON)

So `--ckpt WORKDIR` (or a step directory) works wherever a model directory does. Restoring
takes abstract targets with shardings: a checkpoint restores onto any mesh.

SIGTERM (a TPU preemption notice) is recorded by `Preemption`; the loop then saves at once
(`Checkpoints.save_now`) at the next step boundary and stops.
"""

from __future__ import annotations

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
from lladav_jax.train.bookkeeping import Bookkeeping
from lladav_jax.train.step import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint of the workdir that does not restore."""


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
        """Saves (in the background) if `step` is due or `force`; True if a save started."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(book.to_json()),
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
        was."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target),
            opt_state=ocp.args.StandardRestore(opt_target),
            meta=ocp.args.JsonRestore(),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
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
                first = (str(e).strip().splitlines() or [""])[0][:300]
                bad.append((step, f"{type(e).__name__}: {first}"))
                print(f"checkpoint {self.manager.directory / str(step)} does not restore: "
                      f"{bad[-1][1]}", file=sys.stderr)
                if not fallback:
                    raise CheckpointError(
                        f"checkpoint {self.manager.directory / str(step)} does not restore "
                        f"({bad[-1][1]}); move it aside to resume from the one before, or "
                        "set --config.train.on_bad_checkpoint=fallback") from e
                continue
            for b, _ in bad:
                aside = self.manager.directory / f"bad-{b}"
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class Preemption:
    """Records SIGTERM; the loop checkpoints and stops at the next step where the processes
    agree on it."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

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
            return self.requested
        if not sync_point:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))

    def restore(self) -> None:
        """Puts back the SIGTERM handler there was before."""
        signal.signal(signal.SIGTERM, self._previous)
