"""SigLIP vision tower (so400m/14 shapes in `8b`), as LLaDA-V uses it.

Patch conv + learned position embedding, then a stack of pre-norm encoder layers. Only the
layers up to `select_layer` exist: LLaDA-V takes the hidden state of the second-to-last layer
before `post_layernorm`, so the last layer, the final norm and the pooling head are never built.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lladav_jax.models import layers
from lladav_jax.models.attention import attention


def num_kept_layers(vision) -> int:
    """Encoder layers that run: `num_layers + select_layer + 1` (26 of 27 for select -2)."""
    # Negative like `hidden_states[select_layer]` in transformers (index 0 = the embeddings).
    s = vision.select_layer
    n = vision.num_layers + s + 1 if s < 0 else s
    if not 0 < n <= vision.num_layers:
        raise ValueError(f"select_layer {vision.select_layer} out of range for {vision.num_layers}")
    return n


class EncoderLayer(nnx.Module):
    """x += o(attn(ln1(x))); x += fc2(gelu_tanh(fc1(ln2(x))))."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        v = cfg.vision
        d, m = v.hidden_size, v.intermediate_size
        self.num_heads = v.num_heads
        self.attention_impl = cfg.attention_impl
        self.ln1 = layers.layer_norm(d, v.layer_norm_eps, cfg, rngs)
        self.ln2 = layers.layer_norm(d, v.layer_norm_eps, cfg, rngs)
        self.q = layers.linear(d, d, ("embed", "heads"), cfg, rngs, use_bias=True)
        self.k = layers.linear(d, d, ("embed", "heads"), cfg, rngs, use_bias=True)
        self.v = layers.linear(d, d, ("embed", "heads"), cfg, rngs, use_bias=True)
        self.o = layers.linear(d, d, ("heads", "embed"), cfg, rngs, use_bias=True)
        self.fc1 = layers.linear(d, m, ("embed", "mlp"), cfg, rngs, use_bias=True)
        self.fc2 = layers.linear(m, d, ("mlp", "embed"), cfg, rngs, use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, p, d = x.shape
        heads = lambda t: layers.constrain(
            t.reshape(n, p, self.num_heads, d // self.num_heads),
            ("batch", "length", "act_heads", None),
        )
        h = self.ln1(x)
        # attention() applies the 1/sqrt(head_dim) scale, as SigLIP does; no mask (no padding).
        a = attention(
            heads(self.q(h)), heads(self.k(h)), heads(self.v(h)), impl=self.attention_impl
        )
        a = checkpoint_name(a.reshape(n, p, d), "attn_out")
        x = layers.constrain(x + self.o(a), ("batch", "length", "act_embed"))
        h = layers.constrain(self.fc1(self.ln2(x)), ("batch", "length", "act_mlp"))
        x = x + self.fc2(jax.nn.gelu(h, approximate=True))
        return layers.constrain(x, ("batch", "length", "act_embed"))


class SigLIPVision(nnx.Module):
    """pixels [N, H, W, 3] (normalised to [-1, 1]) -> features [N, (H/p)*(W/p), hidden]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        v = cfg.vision
        d, p = v.hidden_size, v.patch_size
        self.remat_policy = cfg.remat_policy
        self.patch_embed = nnx.Conv(
            3,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=True,
            dtype=layers.dtype_of(cfg.dtype),
            param_dtype=layers.dtype_of(cfg.param_dtype),
            kernel_metadata=layers.axes(None, None, None, "embed"),
            bias_metadata=layers.axes("embed"),
            rngs=rngs,
        )
        num_patches = (v.image_size // p) ** 2
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(d**-0.5)(
                rngs.params(), (num_patches, d), layers.dtype_of(cfg.param_dtype)
            ),
            **layers.axes("patch", "embed"),
        )
        self.layers = layers.scan_layers(
            lambda r: EncoderLayer(cfg, rngs=r), num_kept_layers(v), rngs
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.patch_embed(pixels)  # [N, H/p, W/p, D]; row-major flatten = HF's patch order
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x + self.pos_embed[...].astype(x.dtype)
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        return layers.run_layers(self.layers, x, self.remat_policy)


__all__ = ["EncoderLayer", "SigLIPVision", "num_kept_layers"]
