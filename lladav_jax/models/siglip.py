"""SigLIP vision tower (so400m/14 shapes in `8b`), as LLaDA-V uses it.

Patch conv + learned position embedding, then a stack of pre-norm encoder layers. Only the
layers up to `select_layer` exist: LLaDA-V takes the hidden state of the second-to-last layer
before `post_layernorm`, so the last layer, the final norm and the pooling head are never built.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lladav_jax.models import layers
from lladav_jax.models.attention import attention
from lladav_jax.models.config import ModelConfig, ModelConfigLike, VisionConfig
from lladav_jax.models.dense import Adapt
from lladav_jax.models.layers import Numerics


class EncoderLayer(nnx.Module):
    """x += o(attn(ln1(x))); x += fc2(gelu_tanh(fc1(ln2(x))))."""

    def __init__(
        self, v: VisionConfig, numerics: Numerics, attention_impl: str, *, rngs: nnx.Rngs,
        adapt: Callable[[str], Adapt] = lambda _name: Adapt(),
    ) -> None:
        d, m = v.hidden_size, v.intermediate_size
        self.num_heads = v.num_heads
        self.attention_impl = attention_impl
        dense = lambda name, d_in, d_out, names: layers.linear(
            d_in, d_out, names, numerics, rngs, use_bias=True, adapt=adapt(name))
        self.ln1 = layers.layer_norm(d, v.layer_norm_eps, numerics, rngs)
        self.ln2 = layers.layer_norm(d, v.layer_norm_eps, numerics, rngs)
        self.q = dense("q", d, d, ("embed", "heads"))
        self.k = dense("k", d, d, ("embed", "heads"))
        self.v = dense("v", d, d, ("embed", "heads"))
        self.o = dense("o", d, d, ("heads", "embed"))
        self.fc1 = dense("fc1", d, m, ("embed", "mlp"))
        self.fc2 = dense("fc2", m, d, ("mlp", "embed"))

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x [N, P, D] -> [N, P, D]; `rng`: adapter dropout (training)."""
        n, p, d = x.shape
        key = lambda i: None if rng is None else jax.random.fold_in(rng, i)
        heads = lambda t: layers.constrain(
            t.reshape(n, p, self.num_heads, d // self.num_heads),
            ("batch", "length", "act_heads", None),
        )
        h = self.ln1(x)
        # attention() applies the 1/sqrt(head_dim) scale, as SigLIP does; no mask (no padding).
        a = attention(
            heads(self.q(h, key(0))), heads(self.k(h, key(1))), heads(self.v(h, key(2))),
            impl=self.attention_impl,
        )
        a = checkpoint_name(a.reshape(n, p, d), "attn_out")
        x = layers.constrain(x + self.o(a, key(3)), ("batch", "length", "act_embed"))
        h = layers.constrain(self.fc1(self.ln2(x), key(4)), ("batch", "length", "act_mlp"))
        x = x + self.fc2(jax.nn.gelu(h, approximate=True), key(5))
        return layers.constrain(x, ("batch", "length", "act_embed"))


def pos_embed_std(init: str, width: int) -> float:
    """The std of the position embedding's random init: SigLIP's 1/sqrt(width) under `official`;
    1 under `fan_in`, the scale of the patch embedding's output (a lecun-normal conv of pixels in
    [-1, 1]). At 1/sqrt(width) a tower trained from scratch hardly tells its tokens apart by
    place: the demo's motion question sat at chance for 2,048 steps, and left it within ~400 at 1
    (docs/design.md §4.5). A released tower's trained embedding carries place strongly."""
    return 1.0 if init == "fan_in" else width**-0.5


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
            nnx.initializers.normal(pos_embed_std(numerics.init, d))(
                rngs.params(), (v.num_patches, d), numerics.param_dtype
            ),
            **layers.axes("patch", "embed"),
        )
        adapt = lambda name: cfg.adapt(name, vision=True)
        self.layers = layers.scan_layers(
            lambda r: EncoderLayer(v, numerics, cfg.attention_impl, rngs=r, adapt=adapt),
            v.kept_layers, rngs,
        )

    def __call__(self, pixels: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = self.patch_embed(pixels)  # [N, H/p, W/p, D]; row-major flatten = HF's patch order
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x + self.pos_embed[...].astype(x.dtype)
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        return layers.run_layers(self.layers, x, self.remat_policy, dropout_rng)


__all__ = ["EncoderLayer", "SigLIPVision", "pos_embed_std"]
