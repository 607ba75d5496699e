"""Device mesh and logical-axis rules.

Layers name their axes (`embed`, `heads`, `mlp`, `vocab`, `layers`, `batch`, ...); the rules
below map each name onto mesh axes (`data`, `fsdp`, `tensor`). A config may replace the rules.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Parameters: embed/heads/kv_heads/mlp/vocab/layers/norm/patch.
# Activations: batch/length/act_* (kept apart so a parameter rule never reshapes activations).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("patch", None),
)


class MeshError(ValueError):
    """The requested mesh does not fit the devices."""


def make_mesh(
    shape: dict[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh. One axis may be -1: it takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
    if len(sizes) != len(MESH_AXES):
        raise MeshError(f"mesh shape {sizes} must give one size per axis {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise MeshError(
                f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{len(devices)} are present ({jax.default_backend()}); set the sizes so their "
            "product equals the device count, or use -1 for one axis"
        )
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """Activates a mesh and logical rules, so that activation constraints take effect."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def logical_to_mesh(axes: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
    table = dict(rules)
    return PartitionSpec(*(table.get(a) if a is not None else None for a in axes))


def abstract_with_shardings(tree, shardings):
    """Shapes and dtypes of `tree` with the given shardings: a restore target that places
    every array straight into its shards."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings of an nnx State (or abstract state) from its parameters' logical axes."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def _cluster_detected() -> bool:
    """A TPU pod slice or a multi-task SLURM job: jax.distributed finds its peers itself."""
    env = os.environ
    tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in tpu_hosts or int(env.get("SLURM_NTASKS", "1")) > 1 or (
        "MEGASCALE_COORDINATOR_ADDRESS" in env)


def initialize_distributed(settings) -> None:
    """Starts multi-process JAX per `settings` (`mode`: auto | explicit | off; `coordinator`,
    `num_processes`, `process_id` for explicit). A no-op once started or for one process."""
    if settings.mode == "off" or jax.distributed.is_initialized():
        return
    if settings.mode == "explicit":
        if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
            # CPU processes exchange collectives over gloo (tests, simulated clusters).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
    elif settings.mode == "auto":
        if _cluster_detected():
            jax.distributed.initialize()
    else:
        raise ValueError(f"distributed.mode {settings.mode!r}: choose auto, explicit or off")
