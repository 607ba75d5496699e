"""Our model directory: Orbax params + `config.json` + tokenizer files, usable by every command.

    DIR/config.json     the model ConfigDict (`lladav_jax.models.variants`) as JSON
    DIR/params/         an Orbax PyTree checkpoint of the pure parameter dict, i.e.
                        `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
    DIR/tokenizer.json  ... tokenizer files, copied verbatim when given

A directory is written under a temporary name next to DIR and renamed when complete, so an
interrupted write leaves no half model. Parameters may be `LazyParam`s, written one block at a
time (a converter's peak memory is one block, not one stacked parameter). Restoring goes
through abstract targets, so a model is restored directly sharded onto a mesh. Every path may be
a bucket URL (gs://..., `lladav_jax.paths`); there the rename copies the objects server-side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx, traverse_util

from lladav_jax import paths
from lladav_jax.checkpoints import orbax_streaming
from lladav_jax.models import adapters, lladav
from lladav_jax.models.config import ModelConfig, ModelConfigLike, QuantConfig
from lladav_jax.scale import sharding

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# Copied as they are between model directories and Hugging Face directories.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)

Index = tuple[slice, ...]


class ModelDirError(ValueError):
    """A path that is not a usable model directory, or params that do not match its config."""


@dataclasses.dataclass(frozen=True)
class LazyParam:
    """A parameter produced on demand as (index, block) pairs that together cover `shape`.

    All blocks but the last along an axis must have the first block's shape: it becomes the
    storage chunk, so every write fills whole chunks and nothing is buffered or read back.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Callable[[], Iterable[tuple[Index, np.ndarray]]]

    @property
    def size(self) -> int:  # read by Orbax (memory estimate, zero-size check; orbax_streaming)
        return int(np.prod(self.shape))


def lazy(array: np.ndarray) -> LazyParam:
    """An in-memory array as a one-block LazyParam (avoids Orbax's defensive copy)."""
    full = tuple(slice(None) for _ in np.shape(array))
    return LazyParam(tuple(np.shape(array)), np.dtype(array.dtype), lambda: [(full, array)])


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[epath.Path]:
    """Yields a temporary directory next to `path`, renamed to `path` when the block succeeds
    and removed when it fails. Checks up front that `path` is free (unless `overwrite`)."""
    path = paths.as_path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; remove it or choose another output")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():  # overwrite: move the old one aside first, drop it after
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            old.rmtree()
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            tmp.rmtree()


def copy_tokenizer(src: str | os.PathLike | None, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files present in `src` into `dst` byte for byte; returns names."""
    if src is None:
        return []
    src, dst = paths.as_path(src), paths.as_path(dst)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for n in names:  # small files; read whole, so that local and bucket paths mix
        (dst / n).write_bytes((src / n).read_bytes())
    return names


def config_to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"


def save_model_dir(
    path: str | os.PathLike,
    params: nnx.Module | Mapping,
    cfg: ml_collections.ConfigDict,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes a model directory. `params`: an nnx model or its pure parameter dict, whose leaves
    may be jax/numpy arrays or LazyParams. Single-process (conversion, export of a model)."""
    if isinstance(params, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(params, nnx.Param))
    params = jax.tree.map(lambda x: lazy(x) if isinstance(x, np.ndarray) else x, params,
                          is_leaf=lambda x: isinstance(x, LazyParam))
    path = paths.as_path(path)
    with atomic_dir(path, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config_to_json(cfg))
        orbax_streaming.save_tree(tmp / PARAMS_DIR, params, LazyParam)
        copy_tokenizer(tokenizer_dir, tmp)
    return path


TRAIN_CONFIG_FILE = "train_config.json"  # training workdir: the whole run config
CHECKPOINTS_DIR = "checkpoints"  # training workdir: WORKDIR/checkpoints/<step>/params


@dataclasses.dataclass(frozen=True)
class ModelPaths:
    """Where a model's config, parameters and tokenizer files are."""

    config: epath.Path
    params: epath.Path
    tokenizer_dir: epath.Path


def latest_step_dir(workdir: str | os.PathLike) -> epath.Path | None:
    """The newest complete step directory of a training workdir (None if it has none)."""
    root = paths.as_path(workdir) / CHECKPOINTS_DIR
    steps = [d for d in root.iterdir() if d.name.isdigit() and (d / PARAMS_DIR).is_dir()] if (
        root.is_dir()) else []
    return max(steps, key=lambda d: int(d.name)) if steps else None


def resolve(path: str | os.PathLike) -> ModelPaths:
    """What a `--ckpt` names: a model directory, a training workdir (its latest checkpoint), or
    one step directory of a workdir (WORKDIR/checkpoints/STEP), local or a bucket URL. Paths
    come back absolute: Orbax reads no metadata through a relative one."""
    path = paths.as_path(path)
    if (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir():
        return ModelPaths(path / CONFIG_FILE, path / PARAMS_DIR, path)
    if (path / PARAMS_DIR).is_dir() and path.parent.name == CHECKPOINTS_DIR:
        workdir = path.parent.parent
        if (workdir / CONFIG_FILE).is_file():
            return ModelPaths(workdir / CONFIG_FILE, path / PARAMS_DIR, workdir)
    if (path / CONFIG_FILE).is_file() and (step := latest_step_dir(path)) is not None:
        return ModelPaths(path / CONFIG_FILE, step / PARAMS_DIR, path)
    raise ModelDirError(
        f"{path} is not a model directory ({CONFIG_FILE} and {PARAMS_DIR}/), a training workdir "
        f"with a checkpoint ({CONFIG_FILE} and {CHECKPOINTS_DIR}/STEP/{PARAMS_DIR}/), or a step "
        "directory of one"
    )


def run_config(directory: str | os.PathLike) -> dict:
    """The whole config of the training run that wrote `directory` (a workdir's
    train_config.json) as plain data; {} where there is none (a model directory)."""
    path = paths.as_path(directory) / TRAIN_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(resolve(path).config.read_text()))


def _stored_metadata(params_dir: epath.Path) -> dict[tuple[str, ...], object]:
    with ocp.PyTreeCheckpointer() as ckptr:
        return traverse_util.flatten_dict(ckptr.metadata(params_dir).item_metadata.tree)


def check_params(path: str | os.PathLike, cfg: ml_collections.ConfigDict) -> None:
    """One error naming every parameter missing, unexpected or mis-shaped against the config."""
    params_dir = resolve(path).params
    stored = _stored_metadata(params_dir)
    wanted = traverse_util.flatten_dict(lladav.abstract_params(cfg))
    name = ".".join
    problems = [f"missing: {name(k)}" for k in wanted if k not in stored]
    problems += [f"unexpected: {name(k)}" for k in stored if k not in wanted]
    problems += [
        f"{name(k)}: stored {tuple(stored[k].shape)}, config needs {tuple(wanted[k].shape)}"
        for k in wanted if k in stored and tuple(stored[k].shape) != tuple(wanted[k].shape)
    ]
    if problems:
        raise ModelDirError(f"{params_dir} does not match its {CONFIG_FILE}:\n  "
                            + "\n  ".join(problems))


def load_params(
    path: str | os.PathLike,
    cfg: ml_collections.ConfigDict | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
) -> dict:
    """The pure parameter dict as jax arrays in the config's `param_dtype` (cast on read).
    With a mesh every array is restored directly into its shards (logical axes -> `rules`)."""
    cfg = load_config(path) if cfg is None else cfg
    check_params(path, cfg)
    state = _abstract_state(cfg)
    target = sharding.abstract_with_shardings(nnx.to_pure_dict(state),
                                              _shardings(state, mesh, rules))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(resolve(path).params, target)


def _shardings(state: nnx.State, mesh: jax.sharding.Mesh | None, rules) -> dict:
    """Where each parameter of `state` (a model's abstract nnx.Param state) goes, as a pure
    dict: the first device without a mesh, else its logical axes mapped by `rules`."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    return nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))


def _abstract_state(cfg: ModelConfigLike) -> nnx.State:
    return nnx.state(lladav.abstract(cfg), nnx.Param)


def _check_same_base(path: str | os.PathLike, stored: ModelConfig, cfg: ModelConfig) -> None:
    have = traverse_util.flatten_dict(lladav.abstract_params(stored.plain()))
    want = traverse_util.flatten_dict(lladav.abstract_params(cfg.plain()))
    problems = [f"{'.'.join(k)}: stored {tuple(have[k].shape) if k in have else 'nothing'}, "
                f"config needs {tuple(v.shape)}" for k, v in want.items()
                if k not in have or have[k].shape != v.shape]
    if problems:
        raise ModelDirError(f"{resolve(path).params} holds another model than the config:\n  "
                            + "\n  ".join(problems[:10]))


def load_params_as(
    path: str | os.PathLike,
    cfg: ModelConfigLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    seed: int = 0,
) -> dict:
    """The weights of the model in `path`, laid out for `cfg`: the stored model taken as a
    plain one (a LoRA workdir's adapters merged into their kernels), then given fresh adapters
    and/or quantized weights where `cfg` has them (`lladav_jax.models.adapters`).

    Quantized weights are made one stored array at a time, so the float model never exists
    whole: an 8b model loads in int8 onto a 16 GB chip."""
    cfg = ModelConfig.from_config(cfg)
    stored_cfg = ModelConfig.from_config(load_config(path))
    plain = cfg.plain().to_config()
    if not stored_cfg.adapted:
        check_params(path, plain)
        if cfg.quantize.weights == "none":
            params = load_params(path, plain, mesh=mesh, rules=rules)
            if not cfg.adapted:
                return params
            return jax.device_put(adapters.adapt(params, cfg, seed),
                                  _shardings(_abstract_state(cfg), mesh, rules))
    else:
        check_params(path, stored_cfg.to_config())
        _check_same_base(path, stored_cfg, cfg)
    stored = open_params(path)
    targets = _shardings(_abstract_state(cfg), mesh, rules)
    fresh = (adapters.fresh_adapters(cfg, seed, adapters.adapters_of(targets))
             if cfg.lora.rank else {})
    return adapters.adapt_stream(lambda key: _stored_plain(stored, stored_cfg, key), cfg,
                                 fresh, targets)


def _stored_plain(stored: Mapping[tuple[str, ...], StoredParam], cfg: ModelConfig,
                  key: tuple[str, ...]) -> np.ndarray:
    """One weight of the plain layout from a directory that may hold it adapted."""
    parent = key[:-1]
    if key in stored:
        w = stored[key][...]
    else:
        w = adapters.dequantized(stored[(*parent, "qvalue")][...],
                                 stored[(*parent, "qscale")][...])
    if (*parent, "lora_a") in stored:
        w = adapters.with_delta(w, stored[(*parent, "lora_a")][...],
                                stored[(*parent, "lora_b")][...],
                                cfg.lora.alpha / cfg.lora.rank)
    return w


def load_model(
    path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, rules=sharding.DEFAULT_RULES,
    quantize: str | QuantConfig | None = None,
) -> tuple[lladav.LLaDAV, ml_collections.ConfigDict]:
    """(model, config) from a model directory; with a mesh, born sharded (never whole).
    `quantize` (int8 | int4, or a whole QuantConfig with its tile and vision setting): its
    weights quantized as they load, any adapters merged first (the returned config says so)."""
    cfg = load_config(path)
    typed = ModelConfig.from_config(cfg)
    if isinstance(quantize, str):
        quantize = dataclasses.replace(typed.quantize, weights=quantize)
    if quantize is not None and quantize.weights != "none":
        cfg = dataclasses.replace(typed.plain(), quantize=quantize).to_config()
        params = load_params_as(path, cfg, mesh=mesh, rules=rules)
    else:
        params = load_params(path, cfg, mesh=mesh, rules=rules)
    graphdef, state = nnx.split(lladav.abstract(cfg))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), cfg


@dataclasses.dataclass(frozen=True)
class StoredParam:
    """One stored parameter, read in slices (`p[index]` -> numpy) without loading the rest."""

    store: ts.TensorStore

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.store.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.store.dtype.numpy_dtype)

    def __getitem__(self, index) -> np.ndarray:
        return self.store[index].read().result()


def open_params(path: str | os.PathLike) -> dict[tuple[str, ...], StoredParam]:
    """Every stored parameter by its path in the parameter tree, opened for slice reads
    (how an exporter streams a model larger than memory)."""
    params = resolve(path).params
    names = {key: m.name for key, m in _stored_metadata(params).items()}
    return {key: StoredParam(store)
            for key, store in orbax_streaming.open_arrays(params, names).items()}
