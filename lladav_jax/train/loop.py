"""The training loop: `lladav-train --config configs/<file>.py --workdir DIR [--config.k=v]`.

One compiled step per batch on a (data, fsdp, tensor) mesh; checkpoints every N steps and at
once on SIGTERM (a TPU preemption notice), after which the process exits cleanly; re-running
the same command on the same workdir resumes exactly where it stopped (bitwise on the CPU).

The parts: `_start` (a fresh run or the latest checkpoint) and `_train_state` (the arrays the
step takes); `bookkeeping.LogWindow` (the metrics rows, the non-finite count) over
`bookkeeping.Bookkeeping` (what a checkpoint stores besides the arrays); `checkpoint`
(`Checkpoints.save_now`, `Preemption` on SIGTERM); `_finish` (loss curve, held-out accuracy,
summary).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.models import flops, lladav
from lladav_jax.scale import distributed, sharding
from lladav_jax.train import heldout, metrics, optim
from lladav_jax.train.bookkeeping import Bookkeeping, LogWindow
from lladav_jax.train.checkpoint import Checkpoints, Preemption
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
)
from lladav_jax.train.step import TrainState


def _write_workdir_files(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                         tokenizer: Tokenizer) -> None:
    """config.json (the model) and the tokenizer: the workdir doubles as a model directory."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / modeldir.CONFIG_FILE).write_text(modeldir.config_to_json(config.model))
    (workdir / modeldir.TRAIN_CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    tokenizer.save(workdir)


def _initial_params(config: ml_collections.ConfigDict, mesh: Mesh,
                    rules: sharding.Rules) -> dict:
    if config.init_from:
        print(f"initialising from {config.init_from}")
        return modeldir.load_params(config.init_from, config.model, mesh=mesh, rules=rules)
    model = lladav.create(config.model, seed=config.seed, mesh=mesh, rules=rules)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the summary."""
    distributed.initialize_distributed(config.distributed)
    workdir_path = pathlib.Path(workdir)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.logical_rules(config.mesh.get("rules"))
    check_batch(config, mesh)
    tokenizer = load_tokenizer(config.tokenizer)
    _write_workdir_files(workdir_path, config, tokenizer)
    accum, batch_size = config.train.grad_accum, config.data.batch_size
    batches, source_len = make_batches(config, tokenizer,
                                       local_rows(mesh, accum, batch_size, rules))
    data_iter = iter(batches)
    steps = config.train.steps or math.ceil(
        source_len * config.data.num_epochs / config.data.batch_size)
    tx, schedules = optim.make_optimizer(config.optim, steps)

    ckpts = Checkpoints(workdir_path, every=config.train.checkpoint_every,
                        keep=config.train.keep_checkpoints,
                        asynchronous=config.train.async_checkpoints)
    layout = model_layout(config, mesh, tx)
    params, opt_state, book = _start(config, mesh, ckpts, layout, tx, data_iter)
    graphdef, state, frozen = _train_state(mesh, layout, tx, params, opt_state, book)
    step_fn = jit_train_step(graphdef, tx, tokenizer.mask_id,
                             jax.tree.map(lambda x: x.sharding, state))

    writer = metrics.MetricsWriter(workdir_path, book.step, enabled=jax.process_index() == 0)
    progress = _progress(config, steps, book.step)
    window = LogWindow(book, writer, schedules,
                       peak_flops=metrics.peak_flops_per_device(config.train.peak_tflops_per_device),
                       n_devices=jax.device_count(),
                       max_nonfinite_in_a_row=config.train.max_nonfinite_in_a_row,
                       progress=progress)
    preemption = Preemption()
    step = book.step
    try:
        with sharding.sharding_context(mesh, layout.rules):
            while step < steps:
                try:
                    batch = next(data_iter)
                except StopIteration:
                    break
                book.count_skips(batch.pop("skips"))
                samples = int(batch.pop("num_samples"))  # of the global batch
                real_tokens = int(batch.pop("num_tokens"))
                shape = (batch_size, batch["tokens"].shape[1])
                tiles = batch_size * batch["pixels"].shape[1]
                state, m = step_fn(state, frozen,
                                   global_batch(batch, mesh, accum, batch_size, rules))
                step += 1
                window.add(m, samples=samples, tokens=real_tokens,
                           flops=flops.flops_per_step(config.model, shape, tiles))
                progress.update(1)
                stop = preemption.agreed()
                if step % config.train.log_every == 0 or step == steps or stop:
                    window.write_row(step)
                if stop or ckpts.manager.should_save(step):
                    ckpts.save_now(step, state, _params(graphdef, state, frozen), book,
                                   window.carry(), data_iter)
                if stop:
                    ckpts.wait()
                    print(f"\nSIGTERM: checkpointed step {step}; rerun the same command to "
                          "resume")
                    return {"step": step, "preempted": True}
        window.write_row(step)  # the data ran out inside a logging window: its steps' row
        if ckpts.latest_step() != step:
            ckpts.save_now(step, state, _params(graphdef, state, frozen), book,
                           window.carry(), data_iter)
        ckpts.wait()
    finally:
        progress.close()
        preemption.restore()
        ckpts.close()
        writer.close()
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
    resume = ckpts.latest_step()
    if resume is None:
        return _initial_params(config, mesh, layout.rules), None, Bookkeeping.start(config.seed)
    params, opt_state, book = ckpts.restore(resume, nnx.to_pure_dict(layout.sharded),
                                            abstract_opt_state(tx, layout), data_iter)
    print(f"resumed from step {book.step} ({ckpts.manager.directory / str(resume)})")
    return params, opt_state, book


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


def _finish(config: ml_collections.ConfigDict, workdir: pathlib.Path,
            writer: metrics.MetricsWriter, model: nnx.Module, tokenizer: Tokenizer,
            step: int) -> dict:
    """The end of a run: loss curve, held-out accuracy (synthetic data), a summary."""
    summary = {"step": step, "preempted": False}
    rows = writer.rows() if jax.process_index() == 0 else []
    if rows:
        metrics.plot_loss(rows, workdir / "loss.png", title=f"{config.model.name} training")
        summary["final_loss"] = rows[-1]["loss"]
    if config.data.source == "synthetic" and jax.process_count() == 1:
        result = heldout.masked_answer_accuracy(model, config, tokenizer)
        summary.update(result)
        print(f"held-out masked-answer accuracy {result['accuracy']:.3f} on "
              f"{result['count']} samples (chance {result['chance']:.3f})")
        (workdir / "eval.json").write_text(json.dumps(result, indent=2))
    return summary
