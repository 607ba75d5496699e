"""Hugging Face `transformers` reference modules built to our configs, with random weights.

LLaDA is LLaMA without the causal mask: `LlamaModel` given an all-zero 4-D attention mask is
bidirectional and then equals LLaDA's transformer. Norm weights are drawn away from 1 (and
biases from 0) so that a missing or misplaced norm shows in the outputs.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from lladav_jax.data.layout import grid_pinpoints
from lladav_jax.models import weights


def llama_config(cfg) -> transformers.LlamaConfig:
    t = cfg.text
    return transformers.LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
        attn_implementation="eager",
    )


def siglip_config(cfg) -> transformers.SiglipVisionConfig:
    v = cfg.vision
    return transformers.SiglipVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=v.layer_norm_eps,
        attn_implementation="eager",
    )


def onevision_config(cfg) -> transformers.LlavaOnevisionConfig:
    """LLaVA-OneVision set up as LLaDA-V: layer -2, anyres_max_4, 36 (h, w) grid pinpoints."""
    pinpoints = [[h, w] for w, h in grid_pinpoints(cfg.vision.image_size, cfg.image.max_grid)]
    return transformers.LlavaOnevisionConfig(
        vision_config=siglip_config(cfg), text_config=llama_config(cfg),
        vision_feature_layer=cfg.vision.select_layer, vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{cfg.image.max_num_patches}",
        image_grid_pinpoints=pinpoints, projector_hidden_act="gelu",
        image_token_index=cfg.text.vocab_size - 1, tie_word_embeddings=False,
        attn_implementation="eager",
    )


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every weight random; norm weights around 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_((1.0 if is_norm_weight else 0.0) + scale * torch.randn_like(p))
    return model.float().eval()


def state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy() for k, v in model.state_dict().items()}


def official_from_onevision(model: torch.nn.Module, cfg) -> dict[str, np.ndarray]:
    """A LlavaOnevision state dict renamed to the official LLaDA-V keys (ours only)."""
    sd = state_dict(model)
    keys = [k for e in weights.lladav_entries(cfg) for k in e.hf_keys()]
    return {k: sd[weights.llava_onevision_key(k)] for k in keys}


def bidirectional_mask(key_mask: np.ndarray, num_queries: int | None = None) -> torch.Tensor:
    """[B, L] visible keys -> the 4-D additive mask [B, 1, Lq, L] with no causal part."""
    b, n = key_mask.shape
    lq = n if num_queries is None else num_queries
    mask = np.where(key_mask[:, None, None, :] > 0, 0.0, torch.finfo(torch.float32).min)
    return torch.tensor(np.broadcast_to(mask, (b, 1, lq, n)).copy(), dtype=torch.float32)


def assert_close(got, want, rel: float = 1e-5) -> None:
    """Max abs difference within `rel` of the output scale (at least 1)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(1.0, float(np.abs(want).max())))
