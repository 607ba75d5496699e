"""One component at a time against transformers (tiny config, fp32): RoPE, one LLaDA block, one
SigLIP encoder layer. The whole-model tests (test_llada, test_siglip, test_lladav) say that
something differs; these say where."""

import dataclasses

import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.llama import modeling_llama
from transformers.models.siglip import modeling_siglip

from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.models import hf_params, variants
from lladav_jax.models.config import ModelConfig
from lladav_jax.models.llada import Block, apply_rope, rope_tables
from lladav_jax.models.siglip import EncoderLayer
from tests.close import assert_close


def tiny(kv_heads: int = 4):
    cfg = variants.model_config("tiny")
    cfg.text.num_kv_heads = kv_heads
    return cfg


def one_layer(entries: list[hf_params.Entry], prefix: str) -> list[hf_params.Entry]:
    """The per-layer rows of the weight table, for one unstacked layer whose HF keys lose
    `prefix` (e.g. `model.layers.{i}.`)."""
    return [dataclasses.replace(e, ours=e.ours[1:], hf=e.hf.removeprefix(prefix), layers=0)
            for e in entries if e.layers]


def packed_positions(b: int, n: int) -> np.ndarray:
    """Positions restarting per packed sample, some far out (precision of large angles)."""
    pos = np.concatenate([np.arange(n // 2), 1500 + np.arange(n - n // 2)])
    return np.stack([pos, np.arange(n)])[:b].astype(np.int64)


def test_rope_matches_llama_rotary_embedding():
    cfg = tiny()
    t = cfg.text
    positions = packed_positions(2, 24)
    cos, sin = rope_tables(positions, t.head_dim, t.rope_theta)
    rotary = modeling_llama.LlamaRotaryEmbedding(ref.llama_config(cfg))
    x = torch.zeros(1, dtype=torch.float32)
    want_cos, want_sin = rotary(x, torch.from_numpy(positions))
    assert_close(cos, want_cos.numpy())
    assert_close(sin, want_sin.numpy())

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 24, t.num_heads, t.head_dim)).astype(np.float32)
    k = rng.standard_normal((2, 24, t.num_kv_heads, t.head_dim)).astype(np.float32)
    # transformers: [B, H, L, D] with cos/sin [B, L, D] unsqueezed at the heads axis.
    heads_major = lambda a: torch.from_numpy(a.transpose(0, 2, 1, 3).copy())
    want_q, want_k = modeling_llama.apply_rotary_pos_emb(
        heads_major(q), heads_major(k), want_cos, want_sin)
    assert_close(apply_rope(q, cos, sin), want_q.numpy().transpose(0, 2, 1, 3))
    assert_close(apply_rope(k, cos, sin), want_k.numpy().transpose(0, 2, 1, 3))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_block_matches_llama_decoder_layer_bidirectional(kv_heads):
    cfg = tiny(kv_heads)
    mc = ModelConfig.from_config(cfg)
    layer = ref.randomize(modeling_llama.LlamaDecoderLayer(ref.llama_config(cfg), layer_idx=0),
                          scale=0.1)
    block = Block(mc.text, mc.numerics, mc.attention_impl, nnx.Rngs(0))
    entries = one_layer(hf_params.llm_entries(cfg, root=()),
                        hf_params.LLM_PREFIX + "layers.{i}.")
    hf_params.load_hf(block, ref.state_dict(layer), entries, cfg)

    b, n, d = 2, 20, mc.text.hidden_size
    x = np.random.default_rng(1).standard_normal((b, n, d)).astype(np.float32)
    positions = packed_positions(b, n)
    valid = np.ones((b, n), np.int32)
    valid[1, 14:] = 0  # padding: masked as a key, its own rows unspecified
    cos, sin = rope_tables(positions, mc.text.head_dim, mc.text.rope_theta)
    run = nnx.jit(lambda m, x: m(x, cos=cos, sin=sin, segment_ids=valid))
    got = np.asarray(run(block, x))

    rotary = modeling_llama.LlamaRotaryEmbedding(ref.llama_config(cfg))
    xt, pt = torch.from_numpy(x), torch.from_numpy(positions)
    with torch.no_grad():
        want = layer(xt, attention_mask=ref.bidirectional_mask(valid), position_ids=pt,
                     position_embeddings=rotary(xt, pt)).numpy()
    assert_close(got[valid > 0], want[valid > 0])
    # Bidirectional: the first token sees the last one.
    later = x.copy()
    later[0, -1] += 1.0
    moved = np.asarray(run(block, later))
    assert np.abs(moved[0, 0] - got[0, 0]).max() > 1e-4


def test_encoder_layer_matches_siglip_encoder_layer():
    cfg = variants.model_config("tiny")
    mc = ModelConfig.from_config(cfg)
    layer = ref.randomize(modeling_siglip.SiglipEncoderLayer(ref.siglip_config(cfg)), scale=0.1)
    ours = EncoderLayer(mc.vision, mc.numerics, mc.attention_impl, rngs=nnx.Rngs(0))
    entries = one_layer(hf_params.vision_entries(cfg, root=()),
                        hf_params.VISION_PREFIX + "encoder.layers.{i}.")
    hf_params.load_hf(ours, ref.state_dict(layer), entries, cfg)

    p = mc.vision.num_patches
    x = np.random.default_rng(2).standard_normal((3, p, mc.vision.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = layer(torch.from_numpy(x), attention_mask=None).numpy()
    assert_close(nnx.jit(lambda m, x: m(x))(ours, x), want)
