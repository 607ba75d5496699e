"""The run's arrays before they exist: the model and optimizer state on a mesh as abstract,
sharded targets, and the batch as the step receives it. The trainer fills them; `lladav-plan`
compiles against them, so a plan is the run's own program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lladav_jax.data.pipeline import collate
from lladav_jax.models import lladav
from lladav_jax.models.config import ModelConfig
from lladav_jax.scale import sharding
from lladav_jax.train import optim
from lladav_jax.train.step import TrainState, make_train_step, split_accum


def batch_sharding(mesh: Mesh, ndim: int, rules: sharding.Rules) -> NamedSharding:
    """[accum, micro, ...]: the micro-batch rows split over the mesh axes of the `batch` rule
    (data and fsdp by default), as the activations are."""
    return NamedSharding(mesh, PartitionSpec(None, dict(rules)["batch"], *([None] * (ndim - 2))))


def local_rows(mesh: Mesh, accum: int, batch_size: int,
               rules: sharding.Rules) -> list[int] | None:
    """The rows of the global batch that this process's devices hold (None: all, one process),
    in the order `make_array_from_process_local_data` expects them."""
    if jax.process_count() == 1:
        return None
    micro = batch_size // accum
    index = batch_sharding(mesh, 2, rules).addressable_devices_indices_map((accum, micro))
    cols = sorted({j for idx in index.values() for j in range(*idx[1].indices(micro)[:2])})
    return [a * micro + j for a in range(accum) for j in cols]


def global_batch(batch: dict, mesh: Mesh, accum: int, batch_size: int,
                 rules: sharding.Rules) -> dict:
    """This process's rows of the batch -> global arrays [accum, micro, ...]."""
    local = split_accum(batch, accum)
    return {k: jax.make_array_from_process_local_data(
                batch_sharding(mesh, v.ndim, rules), v, (accum, batch_size // accum, *v.shape[2:]))
            for k, v in local.items()}


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
    rules: sharding.Rules  # the logical-axis rules that placed it (the run's mesh.rules)


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """A clear MeshError where the global batch does not split into `grad_accum` micro-batches
    whose rows the batch axes (the `batch` rule: data x fsdp by default) divide."""
    d, accum = config.data, config.train.grad_accum
    axes = dict(sharding.logical_rules(config.mesh.get("rules")))["batch"]
    rows_axes = sharding.axes_size(mesh, axes)
    names = " x ".join((axes,) if isinstance(axes, str) else axes or ("(none)",))
    if d.batch_size % accum or (d.batch_size // accum) % rows_axes:
        raise sharding.MeshError(
            f"data.batch_size {d.batch_size} / train.grad_accum {accum} = "
            f"{d.batch_size / accum:g} rows per micro-batch must be a multiple "
            f"of {names} = {rows_axes} (the rows are split over the batch axes)")


def model_layout(config: ml_collections.ConfigDict, mesh: Mesh,
                 tx: optax.GradientTransformation) -> ModelLayout:
    """Abstract parameters with their shardings (logical axes -> `mesh.rules` over the
    defaults), split into trained and frozen parts, and the optimizer state's shardings.
    A MeshError names every parameter the mesh does not divide, or a bad rule."""
    graphdef, state = nnx.split(lladav.abstract(config.model))
    lora = ModelConfig.from_config(config.model).lora.rank > 0
    trainable_filter = optim.trainable_filter(config.optim.lr, lora=lora)
    rules = sharding.logical_rules(config.mesh.get("rules"))
    sharded = sharding.abstract_with_shardings(state,
                                               sharding.state_shardings(state, mesh, rules))
    sharding.check_divisible(sharded)  # before jax's own error, deep inside a trace
    step_graphdef, trainable, frozen = nnx.split(nnx.merge(graphdef, sharded), trainable_filter,
                                                 ...)
    return ModelLayout(graphdef, state, sharded, trainable_filter, trainable, frozen,
                       step_graphdef, opt_state_shardings(tx, trainable, mesh), rules)


def abstract_opt_state(tx: optax.GradientTransformation, layout: ModelLayout) -> Any:
    """The optimizer state as ShapeDtypeStructs with its shardings (a restore target)."""
    return sharding.abstract_with_shardings(jax.eval_shape(tx.init, layout.trainable),
                                            layout.opt_shardings)


def abstract_train_state(tx: optax.GradientTransformation, layout: ModelLayout,
                         mesh: Mesh) -> TrainState:
    """The TrainState the loop passes to the step, as ShapeDtypeStructs with the shardings its
    arrays get (step count and rng replicated, as `replicated` makes them)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key(0))
    return TrainState(jax.ShapeDtypeStruct((), np.int32, sharding=replicated), layout.trainable,
                      abstract_opt_state(tx, layout),
                      jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated))


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh,
                   length: int | None = None) -> dict:
    """The step's batch argument as ShapeDtypeStructs ([accum, micro, ...], sharded as
    `global_batch` shards it), for a batch padded to `length` (default data.seq_len).
    The shapes come from the pipeline's own collate of one empty row."""
    accum, batch_size = config.train.grad_accum, config.data.batch_size
    rules = sharding.logical_rules(config.mesh.get("rules"))
    one = collate([], 1, length or config.data.seq_len, config.model, pad_id=0)
    return {k: jax.ShapeDtypeStruct((accum, batch_size // accum, *v.shape[1:]), v.dtype,
                                    sharding=batch_sharding(mesh, v.ndim + 1, rules))
            for k, v in one.items()}


def step_options(train: ml_collections.ConfigDict) -> dict:
    """The `train` settings that shape the step (`make_train_step`'s keywords):
    complementary_masking (every row runs twice) and head_chunk (the head only where the loss
    is, that many positions at a time; 0: everywhere)."""
    return dict(complementary=bool(train.get("complementary_masking", False)),
                head_chunk=int(train.get("head_chunk", 0)))


def jit_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mask_id: int,
                   state_shardings: TrainState, complementary: bool = False,
                   head_chunk: int = 0) -> Callable:
    """The step as the loop runs it: the state donated and leaving with the shardings it came
    in with (one compilation, the same executable before and after a resume). Keywords:
    `step_options`."""
    return jax.jit(make_train_step(graphdef, tx, mask_id, complementary, head_chunk),
                   donate_argnums=0, out_shardings=(state_shardings, None))


def replicated(mesh: Mesh, value: np.ndarray) -> jax.Array:
    """A host value (the same in every process) as an array replicated over the mesh."""
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, PartitionSpec()),
                                        lambda index: value[index])


def opt_state_shardings(tx: optax.GradientTransformation, trainable_abstract: nnx.State,
                        mesh: Mesh) -> Any:
    """The optimizer state's shardings: Adam's moments as the parameters they mirror, the
    rest (step counts) replicated. `tx.init` alone would put it all on one device (its
    zeros do not depend on the parameters' values, so no sharding reaches them)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # parameters of another part
    return optax.tree_map_params(
        tx, lambda p, sh: p if masked(p) else sh, jax.eval_shape(tx.init, trainable_abstract),
        jax.tree.map(lambda x: x.sharding, trainable_abstract),
        transform_non_params=lambda _: replicated, is_leaf=masked)
