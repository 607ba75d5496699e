"""Device mesh and logical-axis rules.

Layers name their axes (`embed`, `heads`, `mlp`, `vocab`, `layers`, `batch`, ...); the rules
below map each name onto mesh axes (`data`, `fsdp`, `tensor`). A run config may replace some
of them: `mesh.rules` holds (logical name, mesh axes) pairs that take the place of the default
rules of those names (`logical_rules`), e.g. embeddings replicated instead of split over fsdp:

    lladav-train ... --config.mesh.rules="(('embed', None),)"

The trainer, `lladav-plan` and `lladav_jax.load` (from the run's train_config.json) all place
the parameters by the rules so made.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Parameters: embed/heads/kv_heads/mlp/vocab/layers/norm/patch.
# Activations: batch/length/act_* (kept apart so a parameter rule never reshapes activations).
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
DEFAULT_RULES: Rules = (
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


def logical_rules(overrides: Sequence | None = None) -> Rules:
    """DEFAULT_RULES with `overrides` (a run config's `mesh.rules`) in place of the rules of the
    same names. Each override is a (logical name, mesh axes) pair, axes one of MESH_AXES, a
    sequence of them, or None (that dimension not split); also accepted flat, name, axes,
    name, axes, ... (what one pair alone or a repeated --config.mesh.rules flag gives). Empty
    or None: DEFAULT_RULES. A name without a default rule or an unknown axis is a MeshError."""
    if not overrides:
        return DEFAULT_RULES
    pairs = overrides
    if isinstance(overrides[0], str):
        if len(overrides) % 2:
            raise MeshError(f"mesh.rules: {tuple(overrides)!r} is not (logical name, mesh axes) "
                            "pairs")
        pairs = tuple(zip(overrides[::2], overrides[1::2]))
    table = dict(DEFAULT_RULES)
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise MeshError(f"mesh.rules: {pair!r} is not a (logical name, mesh axes) pair")
        name, axes = pair
        if name not in table:
            raise MeshError(f"mesh.rules: there is no logical axis {name!r}; the rules name "
                            f"{', '.join(table)}")
        if axes is not None and not isinstance(axes, str):
            axes = tuple(axes)
        unknown = [a for a in ((axes,) if isinstance(axes, str) else axes or ())
                   if a not in MESH_AXES]
        if unknown:
            raise MeshError(f"mesh.rules: {name} -> {axes!r}: {', '.join(map(repr, unknown))} "
                            f"not a mesh axis; use {', '.join(MESH_AXES)}, several, or None")
        table[name] = axes
    return tuple(table.items())


def make_mesh(
    shape: dict[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh. One axis may be -1: it takes the remaining devices.

    A dict may also give `slices` (default 1): the number of TPU slices (multislice), joined
    by the data-centre network. Only the `data` axis spans slices (its gradient all-reduce is
    the one collective that tolerates DCN bandwidth), so `data` must be a multiple of
    `slices`; fsdp and tensor stay inside a slice."""
    devices = list(jax.devices() if devices is None else devices)
    slices = 1
    if isinstance(shape, dict):
        slices = int(shape.get("slices", 1))
        sizes = [shape.get(a, 1) for a in MESH_AXES]
    else:
        sizes = list(shape)
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
    grid = device_grid(sizes, slices, devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(sizes: Sequence[int], slices: int, devices: Sequence) -> np.ndarray:
    """The devices arranged as `sizes` (data, fsdp, tensor), `slices` slices along `data`.

    Devices of a real multislice job carry `slice_index`: jax's hybrid mesh then keeps each
    slice's devices together and lays them out along its ICI torus. Elsewhere (CPU, simulated
    devices, GPUs) a plain reshape with `data` outermost: slice k is the k-th block of
    devices."""
    data, fsdp, tensor = sizes
    if slices < 1:
        raise MeshError(f"mesh.slices={slices}: must be at least 1")
    if data % slices:
        raise MeshError(
            f"mesh data={data} is not a multiple of slices={slices}: only the data axis spans "
            f"slices; set data to a multiple of {slices} (e.g. data={slices}, fsdp=-1)")
    if slices > 1 and hasattr(devices[0], "slice_index"):
        found = len({d.slice_index for d in devices})
        if found != slices:
            raise MeshError(f"mesh.slices={slices} but the devices belong to {found} slices")
        from jax.experimental import mesh_utils

        try:
            return mesh_utils.create_hybrid_device_mesh(
                [data // slices, fsdp, tensor], [slices, 1, 1], devices)
        except ValueError as e:  # e.g. slices of unequal sizes
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} over {slices} slices: {e}") from e
    return np.asarray(devices, dtype=object).reshape(sizes)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """Activates a mesh and logical rules, so that activation constraints take effect."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def abstract_with_shardings(tree, shardings):
    """Shapes and dtypes of `tree` with the given shardings: a restore target that places
    every array straight into its shards."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def axes_size(mesh, axes: str | Sequence[str] | None) -> int:
    """Devices that mesh axes span (one name, several, or None: 1), as a PartitionSpec entry
    gives them."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in names)


def check_divisible(tree, what: str = "parameters") -> None:
    """Raises a MeshError naming every leaf (ShapeDtypeStructs or arrays with NamedShardings)
    whose sharded dimensions the mesh axes do not divide, with the largest axis sizes that
    would divide them all: jax refuses such shardings, deep inside a trace."""
    bad, dims_of = [], collections.defaultdict(list)
    mesh = None
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        mesh = leaf.sharding.mesh
        for i, (dim, axes) in enumerate(zip(leaf.shape, leaf.sharding.spec)):
            size = axes_size(mesh, axes)
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if len(axes) == 1:
                dims_of[axes[0]].append(dim)
            if dim % size:
                name = jax.tree_util.keystr(path, simple=True, separator=".")
                name = name.removesuffix(".value")  # nnx Variables' leaf
                bad.append(f"{name} {tuple(leaf.shape)}: dimension {i} "
                           f"({dim}) over {'x'.join(axes)} ({size})")
    if not bad:
        return
    hints = [f"{a} must divide {math.gcd(*dims)}" for a, dims in dims_of.items()
             if mesh.shape[a] > 1 and math.gcd(*dims) % mesh.shape[a]]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise MeshError(
        f"{what} do not split evenly over the mesh {dict(mesh.shape)}: {'; '.join(bad[:5])}"
        f"{more}. {', '.join(hints)}; give the other devices to another axis (e.g. a larger "
        "mesh.data with mesh.fsdp=-1)")


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings of an nnx State (or abstract state) from its parameters' logical axes."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
