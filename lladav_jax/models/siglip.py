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
from lladav_jax.models.config import ModelConfig, ModelConfigLike, VisionConfig
from lladav_jax.models.layers import Numerics


class EncoderLayer(nnx.Module):
    """x += o(attn(ln1(x))); x += fc2(gelu_tanh(fc1(ln2(x))))."""

    def __init__(
        self, v: VisionConfig, numerics: Numerics, attention_impl: str, *, rngs: nnx.Rngs
    ) -> None:
        d, m = v.hidden_size, v.intermediate_size
        self.num_heads = v.num_heads
        self.attention_impl = attention_impl
        self.ln1 = layers.layer_norm(d, v.layer_norm_eps, numerics, rngs)
        self.ln2 = layers.layer_norm(d, v.layer_norm_eps, numerics, rngs)
        self.q = layers.linear(d, d, ("embed", "heads"), numerics, rngs, use_bias=True)
        self.k = layers.linear(d, d, ("embed", "heads"), numerics, rngs, use_bias=True)
        self.v = layers.linear(d, d, ("embed", "heads"), numerics, rngs, use_bias=True)
        self.o = layers.linear(d, d, ("heads", "embed"), numerics, rngs, use_bias=True)
        self.fc1 = layers.linear(d, m, ("embed", "mlp"), numerics, rngs, use_bias=True)
        self.fc2 = layers.linear(m, d, ("mlp", "embed"), numerics, rngs, use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, P, D] -> [N, P, D]."""
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

    def __init__(self, cfg: ModelConfigLike, *, rngs: nnx.Rngs) -> None:
        cfg = ModelConfig.from_config(cfg)
        v, numerics = cfg.vision, cfg.numerics
        d, p = v.hidden_size, v.patch_size
        self.remat_policy = cfg.remat_policy
        self.patch_embed = nnx.Conv(
            3,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=True,
            dtype=numerics.dtype,
            param_dtype=numerics.param_dtype,
            kernel_metadata=layers.axes(None, None, None, "embed"),
            bias_metadata=layers.axes("embed"),
            rngs=rngs,
        )
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(d**-0.5)(
                rngs.params(), (v.num_patches, d), numerics.param_dtype
            ),
            **layers.axes("patch", "embed"),
        )
        self.layers = layers.scan_layers(
            lambda r: EncoderLayer(v, numerics, cfg.attention_impl, rngs=r), v.kept_layers, rngs
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.patch_embed(pixels)  # [N, H/p, W/p, D]; row-major flatten = HF's patch order
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x + self.pos_embed[...].astype(x.dtype)
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        return layers.run_layers(self.layers, x, self.remat_policy)


__all__ = ["EncoderLayer", "SigLIPVision"]
