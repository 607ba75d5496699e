"""LLaDA-8B: a LLaMA-3-shaped transformer with bidirectional attention (docs/design.md §1.1).

Pre-norm RMSNorm blocks, half-split ("rotate_half") RoPE, SwiGLU MLP, untied output head, no
biases. Attention sees every token of the same segment: padding (segment 0) and other packed
samples are the only things masked, unless the config sets `attention_mask="conversation"`:
then, given turn ids, a token also sees only its own and earlier turns. Layers are stacked and
run by a scan.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lladav_jax.models import layers
from lladav_jax.models.attention import DEFAULT_MAX_TURNS, attention
from lladav_jax.models.config import ModelConfig, ModelConfigLike, TextConfig
from lladav_jax.models.dense import Adapt, Embedding
from lladav_jax.models.layers import Numerics, RMSNorm, constrain, linear

ACT = ("batch", "length", "act_embed")


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, head_dim] in float32, the frequencies repeated over both halves (HF)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, H, D]; rotates the first half against the second (not interleaved pairs)."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Block(nnx.Module):
    """One transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, t: TextConfig, numerics: Numerics, attention_impl: str, rngs: nnx.Rngs,
        adapt: Callable[[str], Adapt] = lambda _name: Adapt(), *,
        max_turns: int = DEFAULT_MAX_TURNS,
    ) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.attention_impl, self.max_turns = attention_impl, max_turns
        d, q_dim, kv_dim = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        dense = lambda name, d_in, d_out, names: linear(d_in, d_out, names, numerics, rngs,
                                                        adapt=adapt(name))
        self.attn_norm = RMSNorm(d, t.rms_norm_eps, numerics)
        self.q = dense("q", d, q_dim, ("embed", "heads"))
        self.k = dense("k", d, kv_dim, ("embed", "kv_heads"))
        self.v = dense("v", d, kv_dim, ("embed", "kv_heads"))
        self.o = dense("o", q_dim, d, ("heads", "embed"))
        self.mlp_norm = RMSNorm(d, t.rms_norm_eps, numerics)
        self.gate = dense("gate", d, t.intermediate_size, ("embed", "mlp"))
        self.up = dense("up", d, t.intermediate_size, ("embed", "mlp"))
        self.down = dense("down", t.intermediate_size, d, ("mlp", "embed"))

    def __call__(
        self,
        x: jax.Array,
        *,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        start: jax.Array | int = 0,
        kv_segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
        turn_ids: jax.Array | None = None,
        kv_turn_ids: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, n, D] -> [B, n, D]. With `cache` (K, V of the whole sequence, [B, L, Hkv, Dh]),
        x is the chunk at `start`: its fresh K/V replace the cached ones there, it attends to
        the whole sequence (`kv_segment_ids` [B, L]), and the updated cache is returned too.
        `rng`: adapter dropout (training), one key per layer (`layers.run_layers`).
        `turn_ids` [B, n] (and `kv_turn_ids` [B, L] with a cache): the conversation mask; None
        (as `LLaDA` passes unless its config asks for it): bidirectional."""
        b, n = x.shape[:2]
        key = lambda i: None if rng is None else jax.random.fold_in(rng, i)
        h = self.attn_norm(x)
        q = self.q(h, key(0)).reshape(b, n, self.num_heads, self.head_dim)
        k = self.k(h, key(1)).reshape(b, n, self.num_kv_heads, self.head_dim)
        v = self.v(h, key(2)).reshape(b, n, self.num_kv_heads, self.head_dim)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None))
        if cache is not None:
            at = (0, start, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
        out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                        q_turn_ids=turn_ids, kv_turn_ids=kv_turn_ids, max_turns=self.max_turns,
                        impl=self.attention_impl)
        out = checkpoint_name(out.reshape(b, n, -1), "attn_out")
        x = constrain(x + self.o(out, key(3)), ACT)
        h = self.mlp_norm(x)
        h = constrain(jax.nn.silu(self.gate(h, key(4))) * self.up(h, key(5)),
                      ("batch", "length", "act_mlp"))
        x = constrain(x + self.down(h, key(6)), ACT)
        return x if cache is None else (x, (k, v))


class LLaDA(nnx.Module):
    """Token embeddings -> stacked blocks -> final norm -> untied head."""

    def __init__(self, cfg: ModelConfigLike, *, rngs: nnx.Rngs) -> None:
        cfg = ModelConfig.from_config(cfg)
        t, numerics = cfg.text, cfg.numerics
        self.remat_policy = cfg.remat_policy
        # Turn ids are dropped (`_turns`) unless the config asks for the conversation mask.
        self.attention_mask = cfg.attention_mask
        self.head_dim, self.rope_theta = t.head_dim, t.rope_theta
        self.num_layers, self.num_kv_heads = t.num_layers, t.num_kv_heads
        q = cfg.quantize
        self.embed = Embedding(t.vocab_size, t.hidden_size, ("vocab", "embed"), numerics.dtype,
                               numerics.param_dtype, rngs, weights=q.weights, tile=q.tile)
        adapt = cfg.adapt
        self.layers = layers.scan_layers(
            lambda r: Block(t, numerics, cfg.attention_impl, r, adapt, max_turns=cfg.max_turns),
            t.num_layers, rngs,
        )
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, numerics)
        self.lm_head = linear(t.hidden_size, t.vocab_size, ("embed", "vocab"), numerics, rngs,
                              adapt=cfg.adapt("lm_head", adapter=False))

    def hidden_states(
        self,
        embeds: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        turn_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Input embeddings [B, L, D] -> final-norm hidden states [B, L, D].

        positions: RoPE positions [B, L] (restart per packed sample); default 0..L-1.
        segment_ids: [B, L], 0 = padding; default: one segment, no padding.
        dropout_rng: the key of LoRA dropout (training); None: no dropout.
        turn_ids: [B, L] dialogue turns (0 first), read only under attention_mask=conversation.
        """
        b, n = embeds.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        if segment_ids is None:
            segment_ids = jnp.ones((b, n), jnp.int32)
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
        x = constrain(embeds, ACT)
        x = layers.run_layers(
            self.layers, x, self.remat_policy, dropout_rng, cos=cos, sin=sin,
            segment_ids=segment_ids, turn_ids=self._turns(turn_ids),
        )
        return self.norm(x)

    def init_cache(
        self, batch: int, length: int, dtype: jnp.dtype | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Zeroed K/V of every layer: two arrays [layers, B, L, kv_heads, head_dim]."""
        shape = (self.num_layers, batch, length, self.num_kv_heads, self.head_dim)
        zeros = jnp.zeros(shape, dtype or self.embed.dtype or jnp.float32)
        return zeros, zeros

    def cached_hidden_states(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        start: jax.Array | int,
        kv_segment_ids: jax.Array,
        turn_ids: jax.Array | None = None,
        kv_turn_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Final-norm hidden states of the chunk `embeds` [B, n, D] at sequence offset `start`,
        attending to the whole sequence through `cache`; returns the updated cache too.
        A chunk covering the whole sequence (start 0) computes a fresh cache. Turn ids: the
        chunk's [B, n] and the sequence's [B, L] (`hidden_states`)."""
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
        turn_ids, kv_turn_ids = self._turns(turn_ids), self._turns(kv_turn_ids)
        x, cache = layers.run_layers_with_cache(
            self.layers, constrain(embeds, ACT), cache, cos=cos, sin=sin,
            segment_ids=segment_ids, start=start, kv_segment_ids=kv_segment_ids,
            turn_ids=turn_ids, kv_turn_ids=kv_turn_ids,
        )
        return self.norm(x), cache

    def _turns(self, turn_ids: jax.Array | None) -> jax.Array | None:
        """The turn ids the blocks get: None (bidirectional) unless the config's mask is the
        conversation mask."""
        return turn_ids if self.attention_mask == "conversation" else None

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-norm hidden states [B, L, D] -> logits [B, L, vocab]."""
        return constrain(self.lm_head(hidden), ("batch", "length", "act_vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        turn_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Token ids [B, L] -> logits [B, L, vocab]. Position i predicts token i (no shift)."""
        return self.logits(self.hidden_states(self.embed(tokens), positions, segment_ids,
                                              turn_ids=turn_ids))
