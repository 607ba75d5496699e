"""lladav-convert: the official Hugging Face / PyTorch layout <-> our model directories.

    lladav-convert import-hf --hf_dir D --out DIR [--param_dtype float32|bfloat16]
    lladav-convert import-hf --llm DIR --vision DIR --out DIR [--seed N]   # stage-1 start
    lladav-convert export-hf --ckpt DIR --out D [--dtype bfloat16|float32] [--shard_bytes N]

A LoRA or QLoRA model directory exports merged; its adapters alone (a PEFT adapter directory)
are `lladav_jax.checkpoints.peft_adapter`'s.

Keys and shapes are those of docs/design.md §6.1 (the table in `lladav_jax.models.hf_params`). Both
directions stream: tensors are read and written a block of rows at a time, so peak memory is
a few blocks, not the model. Everything is checked before anything is written (one error
listing every offending key), and the output appears only when complete (temporary name,
then rename). A tensor holding NaN or inf stops the conversion by name, as it is streamed
(`allow_nonfinite` lets it through). torch is not needed. Every directory may be a bucket URL
(gs://...).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx, traverse_util
from tqdm import tqdm

from lladav_jax import paths
from lladav_jax.checkpoints import modeldir, peft_adapter, safetensors_io
from lladav_jax.checkpoints.safetensors_io import PendingTensor
from lladav_jax.models import hf_params, lladav, variants
from lladav_jax.models.config import ModelConfig
from lladav_jax.models.hf_config import (
    ConversionError,
    config_from_hf,
    config_to_hf,
    text_config_from_hf,
    vision_config_from_hf,
)

DEFAULT_BLOCK_BYTES = 16 << 20  # rows moved at a time; peak memory is a few of these
DEFAULT_SHARD_BYTES = 5 * 10**9
FLOAT_DTYPES = ("float32", "bfloat16")
# Stored dtypes an importer accepts (cast to the parameter dtype on the way).
IMPORTABLE = ("F32", "BF16", "F16", "F64")


def _read_json(path: epath.Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def _finite_blocks(name: Callable[[Any], str], blocks: Callable, allow_nonfinite: bool):
    """`blocks` (a callable giving blocks, or (index, block) pairs), refusing NaN and inf;
    `name(item)` says which tensor an offending item is part of."""
    if allow_nonfinite:
        return blocks

    def checked():
        for item in blocks():
            block = item[1] if isinstance(item, tuple) else item
            if not np.isfinite(block).all():
                raise ConversionError(
                    f"{name(item)} holds NaN or inf; the weights are damaged or come from a "
                    "diverged run (--allow_nonfinite converts them anyway)")
            yield item

    return checked


def _stored_name(e: hf_params.Entry, stored_names: Mapping[str, str]) -> Callable:
    """The stored name of the tensor an import block (index, values) of `e` comes from."""
    def name(item) -> str:
        key = e.hf_keys()[item[0][0].start or 0] if e.layers else e.hf
        return stored_names.get(key, key)

    return name


# --- Import -------------------------------------------------------------------------------


def _check_dtypes(tensors: Mapping, keys, stored_names: Mapping[str, str]) -> None:
    bad = sorted(f"{stored_names.get(k, k)}: {tensors[k].code}" for k in keys
                 if getattr(tensors[k], "code", "F32") not in IMPORTABLE)
    if bad:
        raise ConversionError(f"tensors of unknown or non-float dtype (importable: "
                              f"{list(IMPORTABLE)}): " + ", ".join(bad))


def _import(
    tensors: Mapping, cfg, out, *, tokenizer_dir, stored_names: Mapping[str, str],
    block_bytes: int, progress: bool | None, unknown: Mapping[str, tuple] | None = None,
    allow_nonfinite: bool = False,
) -> epath.Path:
    """Checks keys, shapes and dtypes, then writes the model directory one block at a time.
    `unknown`: stored names that map to no official key (reported with the rest)."""
    entries = hf_params.lladav_entries(cfg)
    abstract = lladav.abstract_params(cfg)
    shapes = {**{k: tuple(t.shape) for k, t in tensors.items()}, **(unknown or {})}
    hf_params.check_hf_keys(entries, shapes, hf_params.expected_hf_shapes(entries, abstract), cfg,
                          stored_names)
    _check_dtypes(tensors, [k for e in entries for k in e.hf_keys()], stored_names)
    dtype = np.dtype(abstract["llm"]["norm"]["weight"].dtype)
    itemsize = max(dtype.itemsize, 4)  # blocks pass through float32 views on the way
    bar = tqdm(total=sum(len(e.hf_keys()) for e in entries), unit="tensor", desc="import",
               disable=None if progress is None else not progress)
    leaves = traverse_util.flatten_dict(abstract)
    params = traverse_util.unflatten_dict({
        e.ours: modeldir.LazyParam(leaves[e.ours].shape, dtype, _finite_blocks(
            _stored_name(e, stored_names), functools.partial(
                hf_params.blocks_from_hf, e, tensors, block_bytes, itemsize,
                on_tensor=lambda _: bar.update()), allow_nonfinite))
        for e in entries})
    with bar:
        return modeldir.save_model_dir(out, params, cfg, tokenizer_dir=tokenizer_dir)


def import_hf(
    hf_dir: str | os.PathLike, out: str | os.PathLike, *, param_dtype: str = "float32",
    block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool | None = None,
    allow_nonfinite: bool = False,
) -> epath.Path:
    """An official LLaDA-V directory (config.json, safetensors, tokenizer) -> model directory."""
    hf_dir = paths.as_path(hf_dir)
    cfg = config_from_hf(_read_json(hf_dir / "config.json"))
    cfg.param_dtype = _float_dtype(param_dtype)
    tensors = safetensors_io.open_checkpoint(hf_dir)
    return _import(tensors, cfg, out, tokenizer_dir=hf_dir, stored_names={},
                   block_bytes=block_bytes, progress=progress, allow_nonfinite=allow_nonfinite)


def fresh_connector(cfg: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    """The connector and image_newline (official keys, HF layout) exactly as
    `lladav.create(cfg, seed=seed)` initialises them. Only they leave the jit, so XLA drops
    the rest of the model's initialisation: this costs the connector's memory, not the 8B."""

    def init():
        state = nnx.to_pure_dict(nnx.state(lladav.LLaDAV(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
        return {"connector": state["connector"], "image_newline": state["image_newline"]}

    entries = [e for e in hf_params.lladav_entries(cfg) if e.ours[0] in ("connector",
                                                                       "image_newline")]
    return dict(hf_params.iter_to_hf(jax.jit(init)(), entries))


def _renamed(directory: epath.Path, rename, skip=()) -> tuple[dict, dict, dict]:
    """(official key -> tensor, official key -> stored name, unknown stored name -> shape)."""
    tensors, names, unknown = {}, {}, {}
    for key, t in safetensors_io.open_checkpoint(directory).items():
        if key.startswith(skip):
            continue
        official = rename(key)
        if official is None:
            unknown[f"{directory.name}/{key}"] = tuple(t.shape)
        elif official in tensors:
            raise hf_params.WeightMappingError(
                f"{directory}: {key} and {names.get(official, official)} are the same tensor")
        else:
            tensors[official] = t
            if official != key:
                names[official] = key
    return tensors, names, unknown


def import_parts(
    llm_dir: str | os.PathLike, vision_dir: str | os.PathLike, out: str | os.PathLike, *,
    seed: int = 0, param_dtype: str = "float32", block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool | None = None, allow_nonfinite: bool = False,
) -> epath.Path:
    """LLaDA-8B(-Instruct) (OLMo-style or HF-port names) + a SigLIP/SigLIP2 vision model ->
    a model directory with a fresh connector and image_newline: the start of stage 1.
    The vision checkpoint may hold any number of layers from the kept ones up (26 or 27)."""
    llm_dir, vision_dir = paths.as_path(llm_dir), paths.as_path(vision_dir)
    llm_json, vis_json = _read_json(llm_dir / "config.json"), _read_json(vision_dir / "config.json")
    cfg = variants.model_config("8b")
    cfg.name = "hf"
    cfg.param_dtype = _float_dtype(param_dtype)
    cfg.text.update(text_config_from_hf(llm_json))
    cfg.vision.update(vision_config_from_hf(vis_json.get("vision_config") or vis_json))
    llm, llm_names, unknown = _renamed(llm_dir, hf_params.llada_key)
    vis, vis_names, _ = _renamed(vision_dir, hf_params.siglip_key, hf_params.SIGLIP_OTHER)
    tensors = {**llm, **vis, **fresh_connector(cfg, seed)}
    return _import(tensors, cfg, out, tokenizer_dir=llm_dir,
                   stored_names={**llm_names, **vis_names}, block_bytes=block_bytes,
                   progress=progress, unknown=unknown, allow_nonfinite=allow_nonfinite)


# --- Export -------------------------------------------------------------------------------


def _float_dtype(name: str) -> str:
    if name not in FLOAT_DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of {list(FLOAT_DTYPES)}")
    return name


def _natural(key: str) -> list:
    """Sort key that puts layer 2 before layer 10 (shards then hold whole layers in order)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def export_hf(
    ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
    shard_bytes: int = DEFAULT_SHARD_BYTES, block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool | None = None, allow_nonfinite: bool = False,
) -> epath.Path:
    """A model directory -> the official layout: safetensors shards of ~shard_bytes with
    `model.safetensors.index.json`, `config.json` (llava_llada) and the tokenizer files. A LoRA
    or QLoRA model is exported merged (`peft_adapter.merged_params`)."""
    out_dtype = safetensors_io.DTYPES[safetensors_io.dtype_code(_float_dtype(dtype))]
    cfg = modeldir.load_config(ckpt)
    modeldir.check_params(ckpt, cfg)
    # A LoRA or quantized model is written as the plain model it computes (adapters folded in,
    # weights dequantized), merged a block at a time as it is read.
    stored = peft_adapter.merged_params(ckpt, cfg)
    cfg = ModelConfig.from_config(cfg).plain().to_config()
    entries = hf_params.lladav_entries(cfg)
    shapes = hf_params.expected_hf_shapes(entries, lladav.abstract_params(cfg))
    itemsize = max(max(p.dtype.itemsize for p in stored.values()), 4)
    tensors = [
        PendingTensor(key, shapes[key], out_dtype, _finite_blocks(
            lambda _, key=key, e=e: f"{key} (ours: {'/'.join(e.ours)})", functools.partial(
                hf_params.hf_blocks, e, layer, stored[e.ours].__getitem__, shapes[key],
                block_bytes, itemsize), allow_nonfinite))
        for e in entries for layer, key in enumerate(e.hf_keys())
    ]
    # LLaDA-V never uses the vision tower's final norm, and we do not keep it; it is written as
    # the identity (weight 1, bias 0) so that strict loaders of the official layout succeed.
    d = cfg.vision.hidden_size
    tensors += [safetensors_io.pending(hf_params.VISION_PREFIX + f"post_layernorm.{n}",
                                       np.full(d, v, out_dtype)) for n, v in (("weight", 1),
                                                                              ("bias", 0))]
    tensors.sort(key=lambda t: _natural(t.key))
    bar = tqdm(total=len(tensors), unit="tensor", desc="export",
               disable=None if progress is None else not progress)
    with bar, modeldir.atomic_dir(out) as tmp:
        safetensors_io.write_sharded(tmp, tensors, shard_bytes, on_tensor=lambda _: bar.update())
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
        modeldir.copy_tokenizer(modeldir.resolve(ckpt).tokenizer_dir, tmp)
    return paths.as_path(out)
