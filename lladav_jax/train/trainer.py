"""The training loop: `lladav-train --config configs/<file>.py --workdir DIR [--config.k=v]`.

One compiled step per batch on a (data, fsdp, tensor) mesh; checkpoints every N steps and at
once on SIGTERM (a TPU preemption notice), after which the process exits cleanly; re-running
the same command on the same workdir resumes exactly where it stopped (bitwise on the CPU).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lladav_jax import modeldir, parallel
from lladav_jax.data.example import SKIP_REASONS
from lladav_jax.data.pipeline import collate
from lladav_jax.models import lladav
from lladav_jax.train import evaluate, metrics, optim
from lladav_jax.train.checkpoint import Checkpoints
from lladav_jax.train.data import load_tokenizer, make_batches
from lladav_jax.train.step import TrainState, make_train_step, split_accum


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


def _batch_sharding(mesh, ndim: int) -> NamedSharding:
    """[accum, micro, ...]: the micro-batch rows split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), *([None] * (ndim - 2))))


def _local_rows(mesh, accum: int, batch_size: int) -> list[int] | None:
    """The rows of the global batch that this process's devices hold (None: all, one process),
    in the order `make_array_from_process_local_data` expects them."""
    if jax.process_count() == 1:
        return None
    micro = batch_size // accum
    index = _batch_sharding(mesh, 2).addressable_devices_indices_map((accum, micro))
    cols = sorted({j for idx in index.values() for j in range(*idx[1].indices(micro)[:2])})
    return [a * micro + j for a in range(accum) for j in cols]


def _global_batch(batch: dict, mesh, accum: int, batch_size: int) -> dict:
    """This process's rows of the batch -> global arrays [accum, micro, ...]."""
    local = split_accum(batch, accum)
    return {k: jax.make_array_from_process_local_data(
                _batch_sharding(mesh, v.ndim), v, (accum, batch_size // accum, *v.shape[2:]))
            for k, v in local.items()}


def train(config, workdir: str) -> dict:
    """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the summary."""
    parallel.initialize_distributed(config.distributed)
    workdir_path = pathlib.Path(workdir)
    mesh = parallel.make_mesh(dict(config.mesh))
    check_batch(config, mesh)
    tokenizer = load_tokenizer(config.tokenizer)
    _write_workdir_files(workdir_path, config, tokenizer)
    pi = jax.process_index()
    accum, batch_size = config.train.grad_accum, config.data.batch_size
    batches, source_len = make_batches(config, tokenizer, _local_rows(mesh, accum, batch_size))
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
    state = TrainState(_replicated(mesh, np.asarray(meta["step"], np.int32)), trainable,
                       opt_state, jax.random.wrap_key_data(
                           _replicated(mesh, np.asarray(meta["rng"], np.uint32))))
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
        with parallel.sharding_context(mesh):
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
                state, m = step_fn(state, frozen, _global_batch(batch, mesh, accum, batch_size))
                step += 1
                pending.append({"m": m, "samples": samples, "tokens": real_tokens,
                                "flops": metrics.flops_per_step(config.model, shape, tiles)})
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


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """The model on a mesh before any array exists: what the trainer fills and `lladav-plan`
    compiles against."""

    graphdef: nnx.GraphDef
    state: nnx.State  # ShapeDtypeStructs without shardings (the trainer fills it)
    sharded: nnx.State  # the same with every parameter's NamedSharding
    trainable_filter: Callable
    trainable: nnx.State  # the trained part of `sharded`
    frozen: nnx.State  # the rest of `sharded`
    step_graphdef: nnx.GraphDef  # the graphdef of the (trainable, frozen) split
    opt_shardings: Any


def check_batch(config, mesh) -> None:
    """A clear MeshError where the global batch does not split into `grad_accum` micro-batches
    whose rows the batch axes (data x fsdp) divide."""
    d, accum = config.data, config.train.grad_accum
    rows_axes = mesh.shape["data"] * mesh.shape["fsdp"]
    if d.batch_size % accum or (d.batch_size // accum) % rows_axes:
        raise parallel.MeshError(
            f"data.batch_size {d.batch_size} / train.grad_accum {accum} = "
            f"{d.batch_size / accum:g} rows per micro-batch must be a multiple "
            f"of data x fsdp = {rows_axes} (the rows are split over both)")


def model_layout(config, mesh, tx: optax.GradientTransformation) -> ModelLayout:
    """Abstract parameters with their shardings, split into trained and frozen parts, and the
    optimizer state's shardings. A MeshError names every parameter the mesh does not divide."""
    graphdef, state = nnx.split(lladav.abstract(config.model))
    trainable_filter = optim.trainable_filter(config.optim.lr)
    sharded = parallel.abstract_with_shardings(state, parallel.state_shardings(state, mesh))
    parallel.check_divisible(sharded)  # before jax's own error, deep inside a trace
    step_graphdef, trainable, frozen = nnx.split(nnx.merge(graphdef, sharded), trainable_filter,
                                                 ...)
    return ModelLayout(graphdef, state, sharded, trainable_filter, trainable, frozen,
                       step_graphdef, _opt_state_shardings(tx, trainable, mesh))


def abstract_opt_state(tx: optax.GradientTransformation, layout: ModelLayout):
    """The optimizer state as ShapeDtypeStructs with its shardings (a restore target)."""
    return parallel.abstract_with_shardings(jax.eval_shape(tx.init, layout.trainable),
                                            layout.opt_shardings)


def abstract_train_state(tx: optax.GradientTransformation, layout: ModelLayout,
                         mesh) -> TrainState:
    """The TrainState the loop passes to the step, as ShapeDtypeStructs with the shardings its
    arrays get (step count and rng replicated, as `_replicated` makes them)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key(0))
    return TrainState(jax.ShapeDtypeStruct((), np.int32, sharding=replicated), layout.trainable,
                      abstract_opt_state(tx, layout),
                      jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated))


def abstract_batch(config, mesh, length: int | None = None) -> dict:
    """The step's batch argument as ShapeDtypeStructs ([accum, micro, ...], sharded as
    `_global_batch` shards it), for a batch padded to `length` (default data.seq_len).
    The shapes come from the pipeline's own collate of one empty row."""
    accum, batch_size = config.train.grad_accum, config.data.batch_size
    one = collate([], 1, length or config.data.seq_len, config.model, pad_id=0)
    return {k: jax.ShapeDtypeStruct((accum, batch_size // accum, *v.shape[1:]), v.dtype,
                                    sharding=_batch_sharding(mesh, v.ndim + 1))
            for k, v in one.items()}


def jit_train_step(graphdef, tx: optax.GradientTransformation, mask_id: int, state_shardings):
    """The step as the loop runs it: the state donated and leaving with the shardings it came
    in with (one compilation, the same executable before and after a resume)."""
    return jax.jit(make_train_step(graphdef, tx, mask_id), donate_argnums=0,
                   out_shardings=(state_shardings, None))


def _replicated(mesh, value: np.ndarray) -> jax.Array:
    """A host value (the same in every process) as an array replicated over the mesh."""
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, PartitionSpec()),
                                        lambda index: value[index])


def _opt_state_shardings(tx, trainable_abstract, mesh):
    """The optimizer state's shardings: Adam's moments as the parameters they mirror, the
    rest (step counts) replicated. `tx.init` alone would put it all on one device (its
    zeros do not depend on the parameters' values, so no sharding reaches them)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # parameters of another part
    return optax.tree_map_params(
        tx, lambda p, sh: p if masked(p) else sh, jax.eval_shape(tx.init, trainable_abstract),
        jax.tree.map(lambda x: x.sharding, trainable_abstract),
        transform_non_params=lambda _: replicated, is_leaf=masked)


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
        result = evaluate.masked_answer_accuracy(model, config, tokenizer)
        summary.update(result)
        print(f"held-out masked-answer accuracy {result['accuracy']:.3f} on "
              f"{result['count']} samples (chance {result['chance']:.3f})")
        (workdir / "eval.json").write_text(json.dumps(result, indent=2))
    return summary
