"""Our model config <-> Hugging Face `config.json` (docs/design.md §6.1), beside the typed config.

`config_from_hf` reads an official LLaDA-V config (model_type llava_llada) into our ConfigDict;
`config_to_hf` writes one, with our `vision_config`, `image_config` and `video_config` dicts
and the attention-mask settings added so that small models round-trip exactly.
`text_config_from_hf` / `vision_config_from_hf` read the parts alone
(LLaDA-8B's own config, a SigLIP config), as the stage-1 importer needs them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from lladav_jax.data.layout import grid_pinpoints
from lladav_jax.models import variants
from lladav_jax.models.config import ModelConfig, ModelConfigLike

SO400M = "google/siglip2-so400m-patch14-384"


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, field or keys at fault."""


def _get(d: Mapping, *names: str, default=None):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def text_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
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


def vision_config_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
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


def config_from_hf(hf: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Our model config from an official LLaDA-V `config.json` (docs/design.md §6.1). Vision fields
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
    if hf.get("mm_spatial_pool_stride"):
        cfg.video.pool_stride = int(hf["mm_spatial_pool_stride"])
    cfg.video.update(hf.get("video_config") or {})
    for key in ("attention_mask", "max_turns"):  # ours: the dialogue-causal mask (§4.3)
        if key in hf:
            cfg[key] = hf[key]
    return cfg


def config_to_hf(cfg: ModelConfigLike, dtype: str = "bfloat16") -> dict[str, Any]:
    """The official `config.json` (model_type llava_llada) plus our `vision_config` and
    `image_config` dicts, so that small models round-trip exactly."""
    cfg = ModelConfig.from_config(cfg)
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
        "mm_projector_type": cfg.connector.kind,
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
        "mm_spatial_pool_stride": cfg.video.pool_stride,
        "vision_config": dataclasses.asdict(v),
        "image_config": dataclasses.asdict(im),
        "video_config": dataclasses.asdict(cfg.video),
        "attention_mask": cfg.attention_mask,
        "max_turns": cfg.max_turns,
    }
