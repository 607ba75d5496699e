"""Model variants: `tiny` (tests), `small` and `1b` (benchmarks), `8b` (the official shapes).

A model config is an `ml_collections.ConfigDict` with three parts, `text` (LLaDA), `vision`
(SigLIP) and `image` (AnyRes layout), plus the numeric and memory settings shared by all parts.
`configs/model.py` exposes these to the command line; every other config starts from one.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("tiny", "small", "1b", "8b")


def _text(**kw) -> ml_collections.ConfigDict:
    base = dict(
        vocab_size=126464,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        intermediate_size=12288,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=16384,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _vision(**kw) -> ml_collections.ConfigDict:
    base = dict(
        hidden_size=1152,
        # Layers as stored in SigLIP so400m; `select_layer=-2` runs all but the last one.
        num_layers=27,
        select_layer=-2,
        num_heads=16,
        intermediate_size=4304,
        image_size=384,
        patch_size=14,
        layer_norm_eps=1e-6,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _image(**kw) -> ml_collections.ConfigDict:
    base = dict(
        # `anyres_max_4` (+ spatial_unpad) for stages 2-3, `plain` (one tile) for stage 1.
        aspect_ratio="anyres_max_4",
        max_grid=6,  # grid candidates: rows, cols in 1..max_grid
        max_num_patches=4,  # the `4` of anyres_max_4: downsample above ~4 tiles of features
        # Fixed shapes for XLA: tiles per sample (base + grid) and visual tokens per sample.
        max_tiles=37,
        max_visual_tokens=7290,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def model_config(name: str = "tiny") -> ml_collections.ConfigDict:
    """Returns the model config of a named variant."""
    if name == "8b":
        text, vision, image = _text(), _vision(), _image()
    elif name == "small":
        text = _text(
            vocab_size=16384,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            num_kv_heads=12,
            head_dim=64,
            intermediate_size=2048,
            max_position_embeddings=8192,
        )
        vision = _vision(hidden_size=384, num_layers=7, num_heads=6, intermediate_size=1536)
        image = _image(max_tiles=10, max_visual_tokens=4608)  # 10 tiles: up to ~4300
    elif name == "1b":
        # ~1B (0.97B): a Llama-3.2-1B-sized LLaDA (MHA like LLaDA-8B) with a 32k vocabulary,
        # and the `small` SigLIP on 224 px tiles; the scale benchmarks' middle size.
        text = _text(
            vocab_size=32768,
            hidden_size=2048,
            num_layers=16,
            num_heads=16,
            num_kv_heads=16,
            head_dim=128,
            intermediate_size=5632,
            max_position_embeddings=8192,
        )
        vision = _vision(hidden_size=384, num_layers=7, num_heads=6, intermediate_size=1536,
                         image_size=224)
        image = _image(max_tiles=10, max_visual_tokens=2688)
    elif name == "tiny":
        text = _text(
            vocab_size=512,  # the demo tokenizer has 504 tokens
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            head_dim=16,
            intermediate_size=128,
            max_position_embeddings=2048,
        )
        vision = _vision(
            hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, image_size=56
        )
        image = _image(max_visual_tokens=256)
    else:
        raise ValueError(f"unknown model variant {name!r}; choose one of {VARIANTS}")
    return ml_collections.ConfigDict(
        dict(
            name=name,
            text=text,
            vision=vision,
            image=image,
            # Video samples (stage 2b): about `fps` frames a second, at most `max_frames` (the
            # official frames_upbound; frames are tiles, so image.max_tiles must hold them),
            # each frame's features bilinearly pooled by `pool_stride` per side.
            video=dict(max_frames=32, fps=1.0, pool_stride=2),
            connector="mlp2x_gelu",
            param_dtype="float32",
            dtype="float32",  # compute dtype; training configs set bfloat16
            remat_policy="none",  # none | full | dots | dots_no_batch | save_attn_out
            attention_impl="xla",  # xla | cudnn (GPU) | splash (TPU) | chunked | auto: attention.py
            # bidirectional | conversation (LLaDA-V's dialogue-causal mask over turn ids)
            attention_mask="bidirectional",
            max_turns=32,  # the most turns of a sample under the conversation mask
            init="official",  # official (N(0, 0.02)) | fan_in (N(0, 1/d_in)): layers.INITS
        )
    )
