"""LLaDA-V: SigLIP tower -> mlp2x_gelu connector -> visual tokens merged into LLaDA's input.

The host computes, per sample, where each visual token goes (`visual_pos`) and which tile
features it is made of (`visual_src`, `visual_w`: up to 4 weighted taps into the flat tile
features plus the `image_newline` vector, see `lladav_jax.data.layout`). AnyRes unpadding,
bilinear downsampling and newlines are then one weighted gather with fixed shapes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lladav_jax.models import layers
from lladav_jax.models.llada import LLaDA
from lladav_jax.models.siglip import SigLIPVision
from lladav_jax.scale import sharding


class Connector(nnx.Module):
    """`mlp2x_gelu`: Linear -> GELU (exact erf) -> Linear, both with bias."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        if cfg.connector != "mlp2x_gelu":
            raise ValueError(f"unknown connector {cfg.connector!r}; only mlp2x_gelu exists")
        d_vis, d = cfg.vision.hidden_size, cfg.text.hidden_size
        self.fc1 = layers.linear(d_vis, d, (None, "embed"), cfg, rngs, use_bias=True)
        self.fc2 = layers.linear(d, d, ("mlp", "embed"), cfg, rngs, use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LLaDAV(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d = cfg.text.hidden_size
        self.vision = SigLIPVision(cfg, rngs=rngs)
        self.connector = Connector(cfg, rngs)
        # The official init: randn * 1/sqrt(hidden).
        self.image_newline = nnx.Param(
            jax.random.normal(rngs.params(), (d,), layers.dtype_of(cfg.param_dtype))
            / math.sqrt(d),
            **layers.axes("embed"),
        )
        self.llm = LLaDA(cfg, rngs=rngs)

    def encode_images(self, pixels: jax.Array) -> jax.Array:
        """Tiles [N, S, S, 3] -> connector features [N, P, hidden]."""
        return self.connector(self.vision(pixels))

    def embed_inputs(
        self,
        tokens: jax.Array,
        pixels: jax.Array | None = None,
        visual_pos: jax.Array | None = None,
        visual_src: jax.Array | None = None,
        visual_w: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings with the visual tokens written at their placeholder positions.

        tokens [B, L]; pixels [B, T, S, S, 3]; visual_pos [B, V] (L = unused row, dropped);
        visual_src [B, V, 4] into the T*P flat features, T*P meaning `image_newline`;
        visual_w [B, V, 4].
        """
        x = self.llm.embed(tokens)
        if pixels is None:
            return x
        b, t = pixels.shape[:2]
        feats = self.encode_images(pixels.reshape(b * t, *pixels.shape[2:]))
        feats = feats.reshape(b, t * feats.shape[1], feats.shape[2])
        newline = jnp.broadcast_to(self.image_newline[...].astype(feats.dtype), (b, 1, x.shape[2]))
        table = jnp.concatenate([feats, newline], axis=1)
        # Four gathers summed, rather than one [B, V, 4, D] gather: a quarter of the memory.
        visual = sum(
            visual_w[:, :, k, None].astype(feats.dtype)
            * jnp.take_along_axis(table, visual_src[:, :, k, None], axis=1)
            for k in range(visual_src.shape[-1])
        )
        rows = jnp.arange(b)[:, None]
        return x.at[rows, visual_pos].set(visual.astype(x.dtype), mode="drop")

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        pixels: jax.Array | None = None,
        visual_pos: jax.Array | None = None,
        visual_src: jax.Array | None = None,
        visual_w: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, L, vocab]; takes a batch dict as keyword arguments (`model(**batch)`)."""
        x = self.embed_inputs(tokens, pixels, visual_pos, visual_src, visual_w)
        return self.llm.logits(self.llm.hidden_states(x, positions, segment_ids))


def create(cfg, *, seed: int = 0, mesh=None, rules=sharding.DEFAULT_RULES) -> LLaDAV:
    """A randomly initialised model. With a mesh, every parameter is born sharded by its logical
    axes (initialised inside one jit with those output shardings, never whole on one device)."""
    make = lambda: LLaDAV(cfg, rngs=nnx.Rngs(seed))
    if mesh is None:
        return nnx.jit(make)()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract(cfg) -> LLaDAV:
    """The model's shapes and dtypes only (no memory): `nnx.eval_shape`."""
    return nnx.eval_shape(lambda: LLaDAV(cfg, rngs=nnx.Rngs(0)))


def param_counts(cfg) -> dict[str, int]:
    """Parameter counts by part: `text` (LLaDA), `vision` (SigLIP), `connector` (+ newline)."""
    state = nnx.to_pure_dict(nnx.state(abstract(cfg), nnx.Param))
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    counts = {
        "text": size(state["llm"]),
        "vision": size(state["vision"]),
        "connector": size(state["connector"]) + size(state["image_newline"]),
    }
    counts["total"] = sum(counts.values())
    return counts
