"""Training checkpoints: Orbax, asynchronous, every N steps, the last K kept.

    WORKDIR/config.json, tokenizer.json   the model config and tokenizer (a model directory's)
    WORKDIR/checkpoints/STEP/params       all parameters (the model-directory format)
                            /opt_state    the optimizer state of the trained parameters
                            /meta         step, RNG, counters (JSON)
                            /data         the Grain iterator state of every process (JSON)

So `--ckpt WORKDIR` (or a step directory) works wherever a model directory does. Restoring
takes abstract targets with shardings: a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import pathlib

import grain
import orbax.checkpoint as ocp

from lladav_jax.checkpoints.modeldir import CHECKPOINTS_DIR


class Checkpoints:
    def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int, asynchronous: bool):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, create=True,
            enable_async_checkpointing=asynchronous,
        )
        self.manager = ocp.CheckpointManager(
            pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR,
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

    def save(self, step: int, params, opt_state, meta: dict, data_iterator, *,
             force: bool = False) -> bool:
        """Saves (in the background) if `step` is due or `force`; True if a save started."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, params_target, opt_target, data_iterator) -> tuple:
        """(params, opt_state, meta) of `step`, placed per the abstract targets' shardings
        (`parallel.abstract_with_shardings`); the data iterator is set to where it was."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target),
            opt_state=ocp.args.StandardRestore(opt_target),
            meta=ocp.args.JsonRestore(),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        return out.params, out.opt_state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
