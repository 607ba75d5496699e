"""LLaDA equals transformers' Llama given an all-zero 4-D mask (bidirectional), fp32."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.models import hf_params, variants
from lladav_jax.models.llada import LLaDA
from tests.close import assert_close


def tiny_cfg(kv_heads: int = 4):
    cfg = variants.model_config("tiny")
    cfg.text.num_kv_heads = kv_heads
    return cfg


def reference(cfg) -> transformers.LlamaForCausalLM:
    return ref.randomize(transformers.LlamaForCausalLM(ref.llama_config(cfg)), scale=0.05)


def ours_from(model: transformers.LlamaForCausalLM, cfg) -> LLaDA:
    ours = LLaDA(cfg, rngs=nnx.Rngs(1))
    hf_params.load_hf(ours, ref.state_dict(model), hf_params.llm_entries(cfg, root=()), cfg)
    return ours


def ref_logits(model, tokens: np.ndarray, key_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens), attention_mask=ref.bidirectional_mask(key_mask)).logits


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_logits_match_bidirectional_llama(kv_heads):
    cfg = tiny_cfg(kv_heads)
    model = reference(cfg)
    ours = ours_from(model, cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (2, 24))
    want = ref_logits(model, tokens, np.ones_like(tokens)).numpy()
    assert_close(nnx.jit(lambda m, t: m(t))(ours, tokens), want)


def test_padding_is_masked():
    cfg = tiny_cfg()
    model = reference(cfg)
    ours = ours_from(model, cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.text.vocab_size, (2, 20))
    valid = np.ones_like(tokens)
    valid[1, 13:] = 0
    want = ref_logits(model, tokens, valid).numpy()
    got = np.asarray(ours(tokens, segment_ids=valid))
    tol = 1e-5 * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got[valid > 0], want[valid > 0], atol=tol, rtol=0)
    # What sits in the padding must not matter.
    junk = tokens.copy()
    junk[1, 13:] = 7
    np.testing.assert_allclose(np.asarray(ours(junk, segment_ids=valid))[valid > 0],
                               got[valid > 0], atol=tol, rtol=0)


@pytest.mark.slow
def test_attention_is_bidirectional_and_segments_are_apart():
    cfg = tiny_cfg()
    ours = LLaDA(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    a = rng.integers(0, cfg.text.vocab_size, (1, 9))
    b = rng.integers(0, cfg.text.vocab_size, (1, 7))
    # A later token changes an earlier position's logits: no causal mask.
    changed = a.copy()
    changed[0, -1] = (changed[0, -1] + 1) % cfg.text.vocab_size
    assert np.abs(np.asarray(ours(changed))[0, 0] - np.asarray(ours(a))[0, 0]).max() > 1e-4
    # Two samples packed in one row (positions restart) equal each one alone.
    packed = np.concatenate([a, b], axis=1)
    positions = np.concatenate([np.arange(9), np.arange(7)])[None]
    segments = np.concatenate([np.full(9, 1), np.full(7, 2)])[None]
    got = np.asarray(ours(packed, positions=positions, segment_ids=segments))
    np.testing.assert_allclose(got[:, :9], np.asarray(ours(a)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[:, 9:], np.asarray(ours(b)), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_and_bf16_compute(policy):
    cfg = tiny_cfg()
    ours = LLaDA(cfg, rngs=nnx.Rngs(0))
    tokens = np.arange(16)[None] % cfg.text.vocab_size
    base = np.asarray(ours(tokens))
    cfg.remat_policy = policy
    remat = LLaDA(cfg, rngs=nnx.Rngs(0))
    loss = lambda m: (m(tokens) ** 2).mean()
    np.testing.assert_allclose(np.asarray(remat(tokens)), base, atol=1e-6, rtol=0)
    g_base = jax_grad_leaves(ours, loss)
    g_remat = jax_grad_leaves(remat, loss)
    for x, y in zip(g_base, g_remat, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
    cfg.dtype = "bfloat16"
    low = LLaDA(cfg, rngs=nnx.Rngs(0))
    out = low(tokens)
    assert out.dtype == np.dtype("bfloat16")
    assert low.layers.q.kernel[...].dtype == np.float32  # params stay float32
    np.testing.assert_allclose(np.asarray(out, np.float32), base, atol=0.1 * np.abs(base).max())


def jax_grad_leaves(model, loss):
    import jax

    grads = nnx.grad(loss)(model)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(grads))]
