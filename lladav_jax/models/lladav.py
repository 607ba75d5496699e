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
from lladav_jax.models.config import ConnectorConfig, ModelConfig, ModelConfigLike
from lladav_jax.models.layers import Numerics
from lladav_jax.models.llada import LLaDA
from lladav_jax.models.siglip import SigLIPVision
from lladav_jax.scale import sharding


class Connector(nnx.Module):
    """`mlp2x_gelu`: Linear -> GELU (exact erf) -> Linear, both with bias."""

    def __init__(
        self, connector: ConnectorConfig, d_vision: int, d_text: int, numerics: Numerics,
        rngs: nnx.Rngs,
    ) -> None:
        if connector.kind != "mlp2x_gelu":
            raise ValueError(f"unknown connector {connector.kind!r}; only mlp2x_gelu exists")
        self.fc1 = layers.linear(d_vision, d_text, (None, "embed"), numerics, rngs, use_bias=True)
        self.fc2 = layers.linear(d_text, d_text, ("mlp", "embed"), numerics, rngs, use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Vision features [..., d_vision] -> [..., d_text]."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LLaDAV(nnx.Module):
    """SigLIP tower -> connector -> visual tokens written into LLaDA's input embeddings."""

    def __init__(self, cfg: ModelConfigLike, *, rngs: nnx.Rngs) -> None:
        cfg = ModelConfig.from_config(cfg)
        d, numerics = cfg.text.hidden_size, cfg.numerics
        self.vision = SigLIPVision(cfg, rngs=rngs)
        self.connector = Connector(cfg.connector, cfg.vision.hidden_size, d, numerics, rngs)
        # The official init: randn * 1/sqrt(hidden).
        self.image_newline = nnx.Param(
            jax.random.normal(rngs.params(), (d,), numerics.param_dtype) / math.sqrt(d),
            **layers.axes("embed"),
        )
        self.llm = LLaDA(cfg, rngs=rngs)

    def encode_images(self, pixels: jax.Array,
                      dropout_rng: jax.Array | None = None) -> jax.Array:
        """Tiles [N, S, S, 3] -> connector features [N, P, hidden]."""
        return self.connector(self.vision(pixels, dropout_rng))

    def embed_inputs(
        self,
        tokens: jax.Array,
        pixels: jax.Array | None = None,
        visual_pos: jax.Array | None = None,
        visual_src: jax.Array | None = None,
        visual_w: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        features: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings with the visual tokens written at their placeholder positions.

        tokens [B, L]; pixels [B, T, S, S, 3], or their `encode_images` features [B, T, P, D]
        computed beforehand (`features`, the sampler's reuse: inference/features.py);
        visual_pos [B, V] (L = unused row, dropped); visual_src [B, V, 4] into the T*P flat
        features, T*P meaning `image_newline`; visual_w [B, V, 4].
        """
        x = self.llm.embed(tokens)
        if pixels is None and features is None:
            return x
        if features is None:
            b, t = pixels.shape[:2]
            features = self.encode_images(pixels.reshape(b * t, *pixels.shape[2:]), dropout_rng)
            features = features.reshape(b, t, *features.shape[1:])
        b = features.shape[0]
        feats = features.reshape(b, -1, features.shape[-1])
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

    def __call__(self, *args, **kwargs) -> jax.Array:
        """Logits [B, L, vocab]: `llm.logits` of `hidden` (same arguments); takes a batch dict
        as keyword arguments (`model(**batch)`)."""
        return self.llm.logits(self.hidden(*args, **kwargs))

    def hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        pixels: jax.Array | None = None,
        visual_pos: jax.Array | None = None,
        visual_src: jax.Array | None = None,
        visual_w: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        turn_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm states [B, L, D], what `__call__` runs the head on (a loss can run it only
        where it counts: `objective.head_loss_terms`). `dropout_rng`: the key of LoRA dropout
        (training); None: none. `turn_ids` [B, L]: the dialogue turns, read only under
        `attention_mask="conversation"`."""
        vision_rng, text_rng = (None, None) if dropout_rng is None else jax.random.split(
            dropout_rng)
        x = self.embed_inputs(tokens, pixels, visual_pos, visual_src, visual_w, vision_rng)
        return self.llm.hidden_states(x, positions, segment_ids, text_rng, turn_ids=turn_ids)


def create(
    cfg: ModelConfigLike, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
) -> LLaDAV:
    """A randomly initialised model. With a mesh, every parameter is born sharded by its logical
    axes (initialised inside one jit with those output shardings, never whole on one device)."""
    cfg = ModelConfig.from_config(cfg)
    make = lambda: LLaDAV(cfg, rngs=nnx.Rngs(seed))
    if mesh is None:
        return nnx.jit(make)()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract(cfg: ModelConfigLike) -> LLaDAV:
    """The model's shapes and dtypes only (no memory): `nnx.eval_shape`."""
    cfg = ModelConfig.from_config(cfg)
    return nnx.eval_shape(lambda: LLaDAV(cfg, rngs=nnx.Rngs(0)))


def abstract_params(cfg: ModelConfigLike) -> dict:
    """The pure parameter dict (`nnx.to_pure_dict`) of `abstract(cfg)`: nested dicts of
    `jax.ShapeDtypeStruct`, the layout of a model directory's params and of `hf_params`."""
    return nnx.to_pure_dict(nnx.state(abstract(cfg), nnx.Param))


def param_counts(cfg: ModelConfigLike) -> dict[str, int]:
    """Parameter counts by part: `text` (LLaDA), `vision` (SigLIP), `connector` (+ newline)."""
    state = abstract_params(cfg)
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    counts = {
        "text": size(state["llm"]),
        "vision": size(state["vision"]),
        "connector": size(state["connector"]) + size(state["image_newline"]),
    }
    counts["total"] = sum(counts.values())
    return counts
