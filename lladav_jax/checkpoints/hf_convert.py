"""lladav-convert: the official Hugging Face / PyTorch layout <-> our model directories.

    lladav-convert import-hf --hf_dir D --out DIR [--param_dtype float32|bfloat16]
    lladav-convert import-hf --llm DIR --vision DIR --out DIR [--seed N]   # stage-1 start
    lladav-convert export-hf --ckpt DIR --out D [--dtype bfloat16|float32] [--shard_bytes N]

Keys and shapes are those of DESIGN.md 1.5 (the table in `lladav_jax.models.hf_params`). Both
directions stream: tensors are read and written a block of rows at a time, so peak memory is
a few blocks, not the model. Everything is checked before anything is written (one error
listing every offending key), and the output appears only when complete (temporary name,
then rename). torch is not needed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from lladav_jax.checkpoints import modeldir, safetensors_io
from lladav_jax.checkpoints.safetensors_io import PendingTensor
from lladav_jax.data.layout import grid_pinpoints
from lladav_jax.models import hf_params, lladav, variants

DEFAULT_BLOCK_BYTES = 16 << 20  # rows moved at a time; peak memory is a few of these
DEFAULT_SHARD_BYTES = 5 * 10**9
FLOAT_DTYPES = ("float32", "bfloat16")
# Stored dtypes an importer accepts (cast to the parameter dtype on the way).
IMPORTABLE = ("F32", "BF16", "F16", "F64")
SO400M = "google/siglip2-so400m-patch14-384"


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, field or keys at fault."""


# --- Configs ------------------------------------------------------------------------------


def _get(d: Mapping, *names: str, default=None):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def text_config_from_hf(hf: Mapping) -> dict:
    """Language-model fields of an HF config: LLaDA's HF-port (Llama) names or its original
    OLMo-style names (`d_model`, `n_layers`, ...)."""
    hidden = _get(hf, "hidden_size", "d_model")
    heads = _get(hf, "num_attention_heads", "n_heads")
    layers = _get(hf, "num_hidden_layers", "n_layers")
    inter = _get(hf, "intermediate_size", "mlp_hidden_size")
    vocab = _get(hf, "embedding_size", "vocab_size")  # OLMo may pad the embedding
    missing = [n for n, v in (("hidden_size", hidden), ("num_attention_heads", heads),
                              ("num_hidden_layers", layers), ("intermediate_size", inter),
                              ("vocab_size", vocab)) if v is None]
    if missing:
        raise ConversionError(f"config.json lacks language-model fields: {missing}")
    return dict(
        vocab_size=int(vocab), hidden_size=int(hidden), num_layers=int(layers),
        num_heads=int(heads), num_kv_heads=int(_get(hf, "num_key_value_heads", "n_kv_heads",
                                                    default=heads)),
        head_dim=int(_get(hf, "head_dim", default=hidden // heads)),
        intermediate_size=int(inter), rope_theta=float(_get(hf, "rope_theta", default=5e5)),
        rms_norm_eps=float(_get(hf, "rms_norm_eps", default=1e-5)),
        max_position_embeddings=int(_get(hf, "max_position_embeddings", "max_sequence_length",
                                         default=16384)),
    )


_VISION_FIELDS = {  # ours <- ours or transformers' SiglipVisionConfig name
    "hidden_size": ("hidden_size",), "num_layers": ("num_layers", "num_hidden_layers"),
    "num_heads": ("num_heads", "num_attention_heads"),
    "intermediate_size": ("intermediate_size",), "image_size": ("image_size",),
    "patch_size": ("patch_size",), "layer_norm_eps": ("layer_norm_eps",),
    "select_layer": ("select_layer",),
}


def vision_config_from_hf(d: Mapping) -> dict:
    """Our vision fields from a `vision_config` dict (our names or SigLIP's)."""
    out = {}
    for ours, names in _VISION_FIELDS.items():
        found = [n for n in names if n in d]
        if found:
            out[ours] = d[found[0]]
    return out


def _max_grid(pinpoints, tile: int) -> int:
    """The n of LLaVA's `(1x1),...,(nxn)` grid list (explicit pairs or that string)."""
    if isinstance(pinpoints, str):
        m = re.fullmatch(r"\(1x1\),\.\.\.,\((\d+)x\1\)", pinpoints.replace(" ", ""))
        if m:
            return int(m.group(1))
    else:
        n = math.isqrt(len(pinpoints))
        if sorted(map(tuple, pinpoints)) == sorted(grid_pinpoints(tile, n)):
            return n
    raise ConversionError(
        f"image_grid_pinpoints {str(pinpoints)[:80]} is not the square grid of {tile}-pixel "
        "tiles (1..n x 1..n) that our AnyRes layout implements"
    )


def config_from_hf(hf: Mapping) -> ml_collections.ConfigDict:
    """Our model config from an official LLaDA-V `config.json` (DESIGN.md 1.5). Vision fields
    are the so400m ones unless the file has a `vision_config` (our exporter writes one)."""
    cfg = variants.model_config("8b")
    cfg.name = "hf"
    cfg.text.update(text_config_from_hf(hf))
    cfg.vision.update(vision_config_from_hf(hf.get("vision_config") or {}))
    if "mm_vision_select_layer" in hf:
        cfg.vision.select_layer = int(hf["mm_vision_select_layer"])
    problems = []
    if hf.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        problems.append(f"mm_projector_type {hf['mm_projector_type']!r} (only mlp2x_gelu)")
    if hf.get("mm_hidden_size", cfg.vision.hidden_size) != cfg.vision.hidden_size:
        problems.append(f"mm_hidden_size {hf['mm_hidden_size']} != vision hidden_size "
                        f"{cfg.vision.hidden_size}")
    aspect = hf.get("image_aspect_ratio", "anyres_max_4")
    if re.fullmatch(r"anyres_max_\d+", aspect):
        cfg.image.aspect_ratio = aspect
        cfg.image.max_num_patches = int(aspect.rsplit("_", 1)[1])
    elif aspect in ("square", "plain"):
        cfg.image.aspect_ratio = "plain"
    else:
        problems.append(f"image_aspect_ratio {aspect!r} (anyres_max_N or square)")
    if problems:
        raise ConversionError("config.json describes a model we do not implement: "
                              + "; ".join(problems))
    if "image_grid_pinpoints" in hf:
        cfg.image.max_grid = _max_grid(hf["image_grid_pinpoints"], cfg.vision.image_size)
        cfg.image.max_tiles = 1 + cfg.image.max_grid**2
    cfg.image.update(hf.get("image_config") or {})  # our extension: the exact settings
    return cfg


def config_to_hf(cfg: ml_collections.ConfigDict, dtype: str = "bfloat16") -> dict:
    """The official `config.json` (model_type llava_llada) plus our `vision_config` and
    `image_config` dicts, so that small models round-trip exactly."""
    t, v, im = cfg.text, cfg.vision, cfg.image
    anyres = im.aspect_ratio != "plain"
    return {
        "architectures": ["LlavaLLaDAModelLM"],
        "model_type": "llava_llada",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": t.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": t.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "use_cache": False,
        "torch_dtype": dtype,
        "mm_projector_type": cfg.connector,
        "mm_hidden_size": v.hidden_size,
        "mm_vision_tower": SO400M,
        "mm_vision_select_layer": v.select_layer,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad" if anyres else "flat",
        "mm_newline_position": "grid",
        "mm_spatial_pool_mode": "bilinear",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "image_aspect_ratio": im.aspect_ratio if anyres else "square",
        "image_grid_pinpoints": [list(p) for p in grid_pinpoints(v.image_size, im.max_grid)],
        "vision_config": v.to_dict(),
        "image_config": im.to_dict(),
    }


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


# --- Import -------------------------------------------------------------------------------


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _leaf(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _abstract(cfg) -> dict:
    return nnx.to_pure_dict(nnx.state(lladav.abstract(cfg), nnx.Param))


def _check_dtypes(tensors: Mapping, keys, stored_names: Mapping[str, str]) -> None:
    bad = sorted(f"{stored_names.get(k, k)}: {tensors[k].code}" for k in keys
                 if getattr(tensors[k], "code", "F32") not in IMPORTABLE)
    if bad:
        raise ConversionError(f"tensors of unknown or non-float dtype (importable: "
                              f"{list(IMPORTABLE)}): " + ", ".join(bad))


def _import(
    tensors: Mapping, cfg, out, *, tokenizer_dir, stored_names: Mapping[str, str],
    block_bytes: int, progress: bool | None, unknown: Mapping[str, tuple] | None = None,
) -> pathlib.Path:
    """Checks keys, shapes and dtypes, then writes the model directory one block at a time.
    `unknown`: stored names that map to no official key (reported with the rest)."""
    entries = hf_params.lladav_entries(cfg)
    abstract = _abstract(cfg)
    shapes = {**{k: tuple(t.shape) for k, t in tensors.items()}, **(unknown or {})}
    hf_params.check_hf_keys(entries, shapes, hf_params.expected_hf_shapes(entries, abstract), cfg,
                          stored_names)
    _check_dtypes(tensors, [k for e in entries for k in e.hf_keys()], stored_names)
    dtype = np.dtype(abstract["llm"]["norm"]["weight"].dtype)
    itemsize = max(dtype.itemsize, 4)  # blocks pass through float32 views on the way
    bar = tqdm(total=sum(len(e.hf_keys()) for e in entries), unit="tensor", desc="import",
               disable=None if progress is None else not progress)
    params: dict = {}
    for e in entries:
        blocks = functools.partial(hf_params.blocks_from_hf, e, tensors, block_bytes, itemsize,
                                   on_tensor=lambda _: bar.update())
        _set(params, e.ours, modeldir.LazyParam(_leaf(abstract, e.ours).shape, dtype, blocks))
    with bar:
        return modeldir.save_model_dir(out, params, cfg, tokenizer_dir=tokenizer_dir)


def import_hf(
    hf_dir: str | os.PathLike, out: str | os.PathLike, *, param_dtype: str = "float32",
    block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool | None = None,
) -> pathlib.Path:
    """An official LLaDA-V directory (config.json, safetensors, tokenizer) -> model directory."""
    hf_dir = pathlib.Path(hf_dir)
    cfg = config_from_hf(_read_json(hf_dir / "config.json"))
    cfg.param_dtype = _float_dtype(param_dtype)
    tensors = safetensors_io.open_checkpoint(hf_dir)
    return _import(tensors, cfg, out, tokenizer_dir=hf_dir, stored_names={},
                   block_bytes=block_bytes, progress=progress)


def fresh_connector(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """The connector and image_newline (official keys, HF layout) exactly as
    `lladav.create(cfg, seed=seed)` initialises them. Only they leave the jit, so XLA drops
    the rest of the model's initialisation: this costs the connector's memory, not the 8B."""

    def init():
        state = nnx.to_pure_dict(nnx.state(lladav.LLaDAV(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
        return {"connector": state["connector"], "image_newline": state["image_newline"]}

    entries = [e for e in hf_params.lladav_entries(cfg) if e.ours[0] in ("connector",
                                                                       "image_newline")]
    return dict(hf_params.iter_to_hf(jax.jit(init)(), entries))


def _renamed(directory: pathlib.Path, rename, skip=()) -> tuple[dict, dict, dict]:
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
    progress: bool | None = None,
) -> pathlib.Path:
    """LLaDA-8B(-Instruct) (OLMo-style or HF-port names) + a SigLIP/SigLIP2 vision model ->
    a model directory with a fresh connector and image_newline: the start of stage 1.
    The vision checkpoint may hold any number of layers from the kept ones up (26 or 27)."""
    llm_dir, vision_dir = pathlib.Path(llm_dir), pathlib.Path(vision_dir)
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
                   progress=progress, unknown=unknown)


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
    progress: bool | None = None,
) -> pathlib.Path:
    """A model directory -> the official layout: safetensors shards of ~shard_bytes with
    `model.safetensors.index.json`, `config.json` (llava_llada) and the tokenizer files."""
    out_dtype = safetensors_io.DTYPES[safetensors_io.dtype_code(_float_dtype(dtype))]
    cfg = modeldir.load_config(ckpt)
    modeldir.check_params(ckpt, cfg)
    stored = modeldir.open_params(ckpt)
    entries = hf_params.lladav_entries(cfg)
    shapes = hf_params.expected_hf_shapes(entries, _abstract(cfg))
    itemsize = max(max(p.dtype.itemsize for p in stored.values()), 4)
    tensors = [
        PendingTensor(key, shapes[key], out_dtype, functools.partial(
            hf_params.hf_blocks, e, layer, stored[e.ours].__getitem__, shapes[key], block_bytes,
            itemsize))
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
    return pathlib.Path(out)
