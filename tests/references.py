"""Hugging Face `transformers` reference modules built to our configs, with random weights.

LLaDA is LLaMA without the causal mask: `LlamaModel` given an all-zero 4-D attention mask is
bidirectional and then equals LLaDA's transformer. Norm weights are drawn away from 1 (and
biases from 0) so that a missing or misplaced norm shows in the outputs.
"""

from __future__ import annotations

import numpy as np
import torch

from lladav_jax.models import weights
from lladav_jax.torch_reference import (  # noqa: F401  (the tests' builders live there)
    bidirectional_mask,
    llama_config,
    onevision_config,
    siglip_config,
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


def assert_close(got, want, rel: float = 1e-5) -> None:
    """Max abs difference within `rel` of the output scale (at least 1)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(1.0, float(np.abs(want).max())))
