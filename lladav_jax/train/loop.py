"""The training loop: `lladav-train --config configs/<file>.py --workdir DIR [--config.k=v]`.

One compiled step per batch on a (data, fsdp, tensor) mesh; checkpoints every N steps and at
once on SIGTERM (a TPU preemption notice) or Ctrl-C, after which the process exits cleanly;
re-running the same command on the same workdir resumes exactly where it stopped (bitwise on
the CPU). One trainer at a time holds a workdir (`workdir_lock`).

The parts: `_start` (a fresh run or the latest checkpoint) and `_train_state` (the arrays the
step takes); `bookkeeping.LogWindow` (the metrics rows, the non-finite count) over
`bookkeeping.Bookkeeping` (what a checkpoint stores besides the arrays); `checkpoint`
(`Checkpoints.save_now`, verified restores, `Preemption` on SIGTERM and SIGINT); `_finish`
(loss curve, held-out accuracy, summary). A run whose data gave no step, or ran out with more
of it skipped than `data.max_skip_fraction`, is an error (`DataQualityError`), after saving
the steps it did train.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from lladav_jax import paths
from lladav_jax.checkpoints import modeldir
from lladav_jax.data.pipeline import DataQualityError
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.models import flops, lladav
from lladav_jax.scale import distributed, sharding
from lladav_jax.train import heldout, integrity, metrics, optim
from lladav_jax.train.bookkeeping import Bookkeeping, LogWindow, StepClock
from lladav_jax.train.checkpoint import Checkpoints, Preemption
from lladav_jax.train.config_check import check_config
from lladav_jax.train.inputs import load_tokenizer, make_batches
from lladav_jax.train.state import (
    ModelLayout,
    abstract_opt_state,
    check_batch,
    global_batch,
    jit_train_step,
    local_rows,
    model_layout,
    replicated,
    step_options,
)
from lladav_jax.train.step import TrainState
from lladav_jax.train.validation import make_validation
from lladav_jax.train.wandb_log import WandbLog
from lladav_jax.train.workdir_lock import WorkdirLock


def _write_workdir_files(workdir: epath.Path, config: ml_collections.ConfigDict,
                         tokenizer: Tokenizer) -> None:
    """config.json (the model) and the tokenizer: the workdir doubles as a model directory
    (local or a bucket URL: `lladav_jax.paths`)."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    paths.write_whole(workdir / modeldir.CONFIG_FILE, modeldir.config_to_json(config.model))
    paths.write_whole(workdir / modeldir.TRAIN_CONFIG_FILE, config.to_json_best_effort(indent=2))
    tokenizer.save(workdir)


def _initial_params(config: ml_collections.ConfigDict, mesh: Mesh,
                    layout: ModelLayout) -> dict:
    if not config.init_from:
        model = lladav.create(config.model, seed=config.seed, mesh=mesh, rules=layout.rules)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))
    print(f"initialising from {config.init_from}")
    # LoRA / QLoRA: the base weights with fresh adapters, quantized as they load if so set.
    params = modeldir.load_params_as(config.init_from, config.model, mesh=mesh,
                                     rules=layout.rules, seed=config.seed)
    _, nonfinite = integrity.summarize(params)
    if nonfinite:
        raise ValueError(f"init_from {config.init_from}: NaN or inf in "
                         f"{integrity.listed(nonfinite)}; the model directory is damaged "
                         "or was saved from a diverged run")
    return params


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the summary."""
    check_config(config)  # a bad setting fails now, not after minutes of work
    distributed.initialize_distributed(config.distributed)
    workdir_path = paths.as_path(workdir)  # a directory, or a bucket URL (gs://bucket/run)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.logical_rules(config.mesh.get("rules"))
    check_batch(config, mesh)
    with WorkdirLock(workdir_path):  # before anything is written there
        return _train(config, workdir_path, mesh, rules)


def _train(config: ml_collections.ConfigDict, workdir_path: epath.Path, mesh: Mesh,
           rules: sharding.Rules) -> dict:
    tokenizer = load_tokenizer(config.tokenizer)
    _write_workdir_files(workdir_path, config, tokenizer)
    accum, batch_size = config.train.grad_accum, config.data.batch_size
    batches, source_len = make_batches(config, tokenizer,
                                       local_rows(mesh, accum, batch_size, rules))
    data_iter = iter(batches)
    steps = config.train.steps or math.ceil(
        source_len * config.data.num_epochs / config.data.batch_size)
    tx, schedules = optim.make_optimizer(config.optim, steps)
    validation = make_validation(config, tokenizer, mesh, rules)

    ckpts = Checkpoints(workdir_path, every=config.train.checkpoint_every,
                        keep=config.train.keep_checkpoints,
                        asynchronous=config.train.async_checkpoints)
    layout = model_layout(config, mesh, tx)
    params, opt_state, book = _start(config, mesh, ckpts, layout, tx, data_iter)
    graphdef, state, frozen = _train_state(mesh, layout, tx, params, opt_state, book)
    step_fn = jit_train_step(graphdef, tx, tokenizer.mask_id,
                             jax.tree.map(lambda x: x.sharding, state),
                             **step_options(config.train))

    primary = jax.process_index() == 0
    writer = metrics.MetricsWriter(workdir_path, book.step, enabled=primary)
    wandb = WandbLog(config.wandb, str(workdir_path), config, enabled=primary)
    progress = _progress(config, steps, book.step)
    window = LogWindow(book, [writer, wandb], schedules,
                       peak_flops=metrics.peak_flops_per_device(config.train.peak_tflops_per_device),
                       n_devices=jax.device_count(),
                       max_nonfinite_in_a_row=config.train.max_nonfinite_in_a_row,
                       progress=progress)

    def save(step: int) -> None:
        started = time.perf_counter()
        book.settle()
        writer.flush()  # the rows this checkpoint covers, in the bucket before it
        ckpts.save_now(step, state, _params(graphdef, state, frozen), book, window.carry(),
                       data_iter)
        window.spend("checkpoint_s", time.perf_counter() - started)

    def validate() -> dict:
        started = time.perf_counter()
        result = validation(graphdef, state.trainable, frozen)
        window.spend("eval_s", time.perf_counter() - started)
        return result

    preemption, clock = Preemption(), StepClock()
    check_every = config.train.preemption_check_every or config.train.log_every
    step, ran_out = book.step, False
    try:
        with sharding.sharding_context(mesh, layout.rules):
            while step < steps:
                started = time.perf_counter()
                try:
                    batch = next(data_iter)
                except StopIteration:
                    ran_out = True
                    break
                idle_from = clock.idle_since()  # None: the chips were busy all along
                if idle_from is not None:
                    window.spend("data_wait_s", time.perf_counter() - max(started, idle_from))
                counts = _batch_counts(config, batch, book)
                # Dispatched, not waited for: the loop waits for the chips only at logging
                # and checkpoint steps (and preemption checks on several processes).
                state, m = step_fn(state, frozen,
                                   global_batch(batch, mesh, accum, batch_size, rules))
                clock.dispatched(m["loss"])
                step += 1
                window.add(m, **counts)
                progress.update(1)
                evaluate = validation is not None and step % config.eval.every == 0
                logging = step % config.train.log_every == 0 or step == steps or evaluate
                saving = ckpts.manager.should_save(step)
                stop = preemption.agreed(logging or saving or step % check_every == 0)
                if logging or stop:
                    window.write_row(step, validate() if evaluate else None)
                if stop or saving:
                    save(step)
                if stop:
                    ckpts.wait()
                    print(f"\n{preemption.requested or 'SIGTERM'}: checkpointed step {step}; "
                          "rerun the same command to resume")
                    return {"step": step, "preempted": True}
        if step == 0:  # nothing trained: nothing saved, so the workdir restarts clean
            data_iter.check_complete()  # most of the data skipped: says which and why
            raise DataQualityError(
                f"the data gave no batch: {source_len} samples with data.batch_size "
                f"{batch_size} and data.num_epochs {config.data.num_epochs}; nothing was "
                "trained or saved")
        window.write_row(step)  # the data ran out inside a logging window: its steps' row
        if ckpts.latest_step() != step:
            save(step)
        ckpts.wait()
        if ran_out:
            data_iter.check_complete()  # after the save: the steps trained are kept
    finally:
        progress.close()
        preemption.restore()
        clock.close()
        ckpts.close()
        writer.close()
        wandb.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
    return _finish(config, workdir_path, writer, nnx.merge(graphdef, state.trainable, frozen),
                   tokenizer, step)


def _start(config: ml_collections.ConfigDict, mesh: Mesh, ckpts: Checkpoints,
           layout: ModelLayout, tx: optax.GradientTransformation,
           data_iter: Any) -> tuple[dict, Any, Bookkeeping]:
    """(params, opt_state or None, bookkeeping): the initial ones, or those of the latest
    checkpoint, restored straight into the shards that abstract targets describe (and the
    data iterator set to where it was)."""
    latest = ckpts.restore_latest(nnx.to_pure_dict(layout.sharded),
                                  abstract_opt_state(tx, layout), data_iter,
                                  fallback=config.train.on_bad_checkpoint == "fallback")
    if latest is None:
        return _initial_params(config, mesh, layout), None, Bookkeeping.start(config.seed)
    resume, (params, opt_state, book) = latest
    print(f"resumed from step {book.step} ({ckpts.manager.directory / str(resume)})")
    return params, opt_state, book


def _batch_counts(config: ml_collections.ConfigDict, batch: dict,
                  book: Bookkeeping) -> dict:
    """Takes the host counts off a batch (skips to `book`); returns the global batch's samples,
    non-padding tokens, and model FLOPs of the real work and as computed."""
    book.count_skips(batch.pop("skips"))
    book.count_skips(batch.pop("local_skips"), local=True)
    samples, tokens = int(batch.pop("num_samples")), int(batch.pop("num_tokens"))
    rows, length = config.data.batch_size, batch["tokens"].shape[1]
    padded_tiles = rows * batch["pixels"].shape[1]
    tiles = int(batch.pop("num_tiles"))
    copies = 2 if config.train.get("complementary_masking", False) else 1  # every row twice
    return {"samples": samples, "tokens": tokens,
            # each sample attends to its own tokens (segments), on average tokens / samples
            "flops": copies * flops.model_flops(config.model, tokens, tokens / max(samples, 1),
                                                tiles),
            "flops_padded": copies * flops.flops_per_step(config.model, (rows, length),
                                                          padded_tiles)}


def _train_state(mesh: Mesh, layout: ModelLayout, tx: optax.GradientTransformation,
                 params: dict, opt_state: Any,
                 book: Bookkeeping) -> tuple[nnx.GraphDef, TrainState, nnx.State]:
    """(graphdef, the state the step trains, the frozen parameters) from the parameters, the
    optimizer state (None: a new one) and the step and RNG key of `book`."""
    state = layout.state
    nnx.replace_by_pure_dict(state, params)
    graphdef, trainable, frozen = nnx.split(nnx.merge(layout.graphdef, state),
                                            layout.trainable_filter, ...)
    if opt_state is None:
        opt_state = jax.jit(tx.init, out_shardings=layout.opt_shardings)(trainable)
    train_state = TrainState(replicated(mesh, np.asarray(book.step, np.int32)), trainable,
                             opt_state, jax.random.wrap_key_data(
                                 replicated(mesh, np.asarray(book.rng, np.uint32))))
    return graphdef, train_state, frozen


def _params(graphdef: nnx.GraphDef, state: TrainState, frozen: nnx.State) -> dict:
    """All parameters, trained and frozen, as one pure dict (the model-directory layout)."""
    return nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state.trainable, frozen), nnx.Param))


def _progress(config: ml_collections.ConfigDict, total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=not config.train.progress_bar or jax.process_index() != 0)


def _finish(config: ml_collections.ConfigDict, workdir: epath.Path,
            writer: metrics.MetricsWriter, model: nnx.Module, tokenizer: Tokenizer,
            step: int) -> dict:
    """The end of a run: loss curve, held-out accuracy (synthetic data), a summary."""
    summary = {"step": step, "preempted": False}
    rows = writer.rows() if jax.process_index() == 0 else []
    if rows:
        metrics.plot_loss(rows, workdir / "loss.png", title=f"{config.model.name} training")
        summary["final_loss"] = rows[-1]["loss"]
    if (config.data.source == "synthetic" or config.data.eval_path) and \
            jax.process_count() == 1 and config.data.eval_size > 0:
        result = heldout.report(model, config, tokenizer)
        summary.update(result)
        paths.write_whole(workdir / "eval.json", json.dumps(result, indent=2))
    return summary
