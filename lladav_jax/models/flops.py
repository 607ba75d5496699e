"""Model FLOPs of a training step, for MFU and the planner.

6 x (matmul parameters) per token, plus attention 12 x layers x length x width per token
(forward + backward). LLaDA's attention is bidirectional: every token attends to the whole
sequence, so the attention FLOPs are NOT halved as for causal models.
"""

from __future__ import annotations

from lladav_jax.models.config import ModelConfig, ModelConfigLike, TextConfig


def _text_matmul_params(t: TextConfig) -> int:
    attn = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_layers * (attn + mlp) + t.hidden_size * t.vocab_size  # + the head


def _vision_matmul_params(cfg: ModelConfig) -> int:
    v = cfg.vision
    per_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    patch = 3 * v.patch_size**2 * v.hidden_size
    connector = v.hidden_size * cfg.text.hidden_size + cfg.text.hidden_size**2
    return v.kept_layers * per_layer + patch + connector


def flops_per_step(cfg: ModelConfigLike, batch_shape: tuple[int, int], tiles: int) -> float:
    """Training FLOPs of one step as computed: `batch_shape` (rows, length) of text, padding
    included, every token attending to the whole row; `tiles` image tiles."""
    rows, length = batch_shape
    return model_flops(cfg, rows * length, length, tiles)


def model_flops(cfg: ModelConfigLike, tokens: int, attended: float, tiles: int) -> float:
    """Training FLOPs of `tokens` text tokens that attend to `attended` tokens each on average,
    and of `tiles` image tiles. Real work (MFU without padding): the non-padding tokens, each
    attending to its own sample (its segment), and the real tiles."""
    cfg = ModelConfig.from_config(cfg)
    t, v = cfg.text, cfg.vision
    text = 6 * _text_matmul_params(t) * tokens
    text += 12 * t.num_layers * attended * t.num_heads * t.head_dim * tokens
    p = v.num_patches
    vision = 6 * _vision_matmul_params(cfg) * tiles * p
    vision += 12 * v.kept_layers * p * v.hidden_size * tiles * p
    return float(text + vision)
