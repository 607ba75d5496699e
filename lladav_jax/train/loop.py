"""The training loop: `lladav-train --config configs/<file>.py --workdir DIR [--config.k=v]`.

One compiled step per batch on a (data, fsdp, tensor) mesh; checkpoints every N steps and at
once on SIGTERM (a TPU preemption notice), after which the process exits cleanly; re-running
the same command on the same workdir resumes exactly where it stopped (bitwise on the CPU).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import signal
import time

import jax
import numpy as np
from flax import nnx

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.example import SKIP_REASONS
from lladav_jax.models import flops, lladav
from lladav_jax.scale import sharding
from lladav_jax.train import heldout, metrics, optim
from lladav_jax.train.checkpoint import Checkpoints
from lladav_jax.train.inputs import load_tokenizer, make_batches
from lladav_jax.train.state import (
    abstract_opt_state,
    check_batch,
    global_batch,
    jit_train_step,
    local_rows,
    model_layout,
    replicated,
)
from lladav_jax.train.step import TrainState


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


class _Preemption:
    """Records SIGTERM; the loop checkpoints and stops at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process was told to stop (every process must stop at the same step)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _write_workdir_files(workdir: pathlib.Path, config, tokenizer) -> None:
    """config.json (the model) and the tokenizer: the workdir doubles as a model directory."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / modeldir.CONFIG_FILE).write_text(modeldir.config_to_json(config.model))
    (workdir / modeldir.TRAIN_CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    tokenizer.save(workdir)


def _initial_params(config, mesh) -> dict:
    if config.init_from:
        print(f"initialising from {config.init_from}")
        return modeldir.load_params(config.init_from, config.model, mesh=mesh)
    model = lladav.create(config.model, seed=config.seed, mesh=mesh)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def train(config, workdir: str) -> dict:
    """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the summary."""
    sharding.initialize_distributed(config.distributed)
    workdir_path = pathlib.Path(workdir)
    mesh = sharding.make_mesh(dict(config.mesh))
    check_batch(config, mesh)
    tokenizer = load_tokenizer(config.tokenizer)
    _write_workdir_files(workdir_path, config, tokenizer)
    pi = jax.process_index()
    accum, batch_size = config.train.grad_accum, config.data.batch_size
    batches, source_len = make_batches(config, tokenizer, local_rows(mesh, accum, batch_size))
    data_iter = iter(batches)
    steps = config.train.steps or math.ceil(
        source_len * config.data.num_epochs / config.data.batch_size)
    tx, schedules = optim.make_optimizer(config.optim, steps)

    ckpts = Checkpoints(workdir_path, every=config.train.checkpoint_every,
                        keep=config.train.keep_checkpoints,
                        asynchronous=config.train.async_checkpoints)
    resume = ckpts.latest_step()
    layout = model_layout(config, mesh, tx)
    graphdef, state = layout.graphdef, layout.state
    meta = {"step": 0, "rng": np.asarray(jax.random.key_data(jax.random.key(config.seed))).tolist(),
            "nonfinite": 0, "nonfinite_in_a_row": 0, "skips": {}, "pending": []}
    if resume is None:
        params = _initial_params(config, mesh)
        opt_state = None
    else:  # restore straight into the shards that abstract targets describe
        params, opt_state, meta = ckpts.restore(resume, nnx.to_pure_dict(layout.sharded),
                                                abstract_opt_state(tx, layout), data_iter)
        print(f"resumed from step {meta['step']} ({ckpts.manager.directory / str(resume)})")
    nnx.replace_by_pure_dict(state, params)
    graphdef, trainable, frozen = nnx.split(nnx.merge(graphdef, state), layout.trainable_filter,
                                            ...)
    if opt_state is None:
        opt_state = jax.jit(tx.init, out_shardings=layout.opt_shardings)(trainable)
    state = TrainState(replicated(mesh, np.asarray(meta["step"], np.int32)), trainable,
                       opt_state, jax.random.wrap_key_data(
                           replicated(mesh, np.asarray(meta["rng"], np.uint32))))
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jit_train_step(graphdef, tx, tokenizer.mask_id, state_shardings)

    writer = metrics.MetricsWriter(workdir_path, meta["step"], enabled=pi == 0)
    peak = metrics.peak_flops_per_device(config.train.peak_tflops_per_device)
    n_devices = jax.device_count()
    skips = collections.Counter(meta["skips"])
    pending: list[dict] = list(meta["pending"])  # per-step host metrics since the last row
    preemption = _Preemption()
    progress = _progress(config, steps, meta["step"])
    window_start = time.perf_counter()
    start_step, step = meta["step"], meta["step"]

    def checkpoint(carry: list[dict]) -> None:
        """Saves now; `carry` is the unlogged part of the window (host values)."""
        meta.update(step=step, skips=dict(skips), pending=carry,
                    rng=np.asarray(jax.random.key_data(state.rng)).tolist())
        ckpts.save(step, _params(graphdef, state, frozen), state.opt_state, dict(meta),
                   data_iter, force=True)

    try:
        with sharding.sharding_context(mesh):
            while step < steps:
                try:
                    batch = next(data_iter)
                except StopIteration:
                    break
                for reason, n in batch.pop("skips").items():
                    skips[reason] += int(n)
                samples = int(batch.pop("num_samples"))  # of the global batch
                real_tokens = int(batch.pop("num_tokens"))
                shape = (batch_size, batch["tokens"].shape[1])
                tiles = batch_size * batch["pixels"].shape[1]
                state, m = step_fn(state, frozen, global_batch(batch, mesh, accum, batch_size))
                step += 1
                pending.append({"m": m, "samples": samples, "tokens": real_tokens,
                                "flops": flops.flops_per_step(config.model, shape, tiles)})
                progress.update(1)
                stop = preemption.agreed()
                if step % config.train.log_every == 0 or step == steps or stop:
                    pending = _host(pending)
                    elapsed = time.perf_counter() - window_start
                    row = _row(step, pending, schedules, skips, elapsed, peak, n_devices,
                               resumed=step - len(pending) < start_step)
                    writer.write(row)
                    progress.set_postfix(loss=f"{row['loss']:.4f}")
                    # After the row is written: the step that ends the run is on record too.
                    _count_nonfinite(pending, meta, config.train.max_nonfinite_in_a_row)
                    pending, window_start = [], time.perf_counter()
                if stop or ckpts.manager.should_save(step):
                    pending = _host(pending)
                    checkpoint(pending)
                if stop:
                    ckpts.wait()
                    print(f"\nSIGTERM: checkpointed step {step}; rerun the same command to "
                          "resume")
                    return {"step": step, "preempted": True}
        if pending:  # the data ran out inside a logging window: its steps get their row
            pending = _host(pending)
            writer.write(_row(step, pending, schedules, skips,
                              time.perf_counter() - window_start, peak, n_devices,
                              resumed=step - len(pending) < start_step))
            _count_nonfinite(pending, meta, config.train.max_nonfinite_in_a_row)
            pending = []
        if ckpts.latest_step() != step:
            checkpoint([])
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


def _params(graphdef, state: TrainState, frozen) -> dict:
    """All parameters, trained and frozen, as one pure dict (the model-directory layout)."""
    return nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state.trainable, frozen), nnx.Param))


def _count_nonfinite(pending: list[dict], meta: dict, limit: int) -> None:
    """Counts skipped (non-finite) steps; raises after `limit` in a row."""
    for p in pending:
        if not p["m"]["skipped"]:
            meta["nonfinite_in_a_row"] = 0
            continue
        meta["nonfinite_in_a_row"] += 1
        meta["nonfinite"] += 1
        if meta["nonfinite_in_a_row"] >= limit:
            raise NonFiniteLossError(
                f"{meta['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient "
                f"(the last loss was {p['m']['loss']}); their updates were skipped. Lower the "
                "learning rate, check the data, or raise train.max_nonfinite_in_a_row"
            )


def _host(pending: list[dict]) -> list[dict]:
    """Per-step metrics on the host (JSON), to carry an unfinished logging window over a
    checkpoint: a resumed run then writes the same rows as an uninterrupted one."""
    out = []
    for p in pending:
        out.append({**p, "m": {k: float(v) for k, v in jax.device_get(p["m"]).items()}})
    return out


def _row(step, pending, schedules, skips, elapsed, peak, n_devices, resumed) -> dict:
    ms = [p["m"] for p in pending]
    ok = [m for m in ms if not m["skipped"]] or ms
    lrs = {p: float(s(step - 1)) for p, s in schedules.items()}
    tokens = sum(p["tokens"] for p in pending)  # global batches: every process sees them all
    flops = sum(p["flops"] for p in pending)
    row = {
        "step": step,
        "loss": float(np.mean([m["loss"] for m in ok])),
        "learning_rate": lrs.get("llm", max(lrs.values())),
        "grad_norm": float(np.mean([m["grad_norm"] for m in ok])),
        # Throughput of a window that began before a resume mixes two processes: not reported.
        "tokens_per_second": None if resumed else tokens / elapsed,
        "mfu": None if resumed else flops / elapsed / (peak * n_devices),
        "samples": int(sum(p["samples"] for p in pending)),
        "nonfinite_steps": int(sum(m["skipped"] for m in ms)),
    }
    row.update({f"lr_{p}": v for p, v in lrs.items()})
    row.update({f"skipped_{r}": int(skips.get(r, 0)) for r in SKIP_REASONS})
    return row


def _progress(config, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=not config.train.progress_bar or jax.process_index() != 0)


def _finish(config, workdir: pathlib.Path, writer, model, tokenizer, step: int) -> dict:
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
