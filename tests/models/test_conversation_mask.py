"""The dialogue-causal attention mask (`attention_mask="conversation"`): the mask of a real
template sample spelled out, xla / splash (interpret) / chunked / cudnn's mask agreeing, the
default left unchanged, and the model and sampler reading turn ids only under the conversation
mask."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.template import encode_chat_prompt, llava_llada
from lladav_jax.diffusion import sampler
from lladav_jax.diffusion.options import SamplerOptions, SpecialIds
from lladav_jax.inference import api
from lladav_jax.models import attention as attn
from lladav_jax.models import lladav, variants
from lladav_jax.models.config import ModelConfig
from lladav_jax.models.llada import LLaDA
from lladav_jax.scale import sharding
from lladav_jax.train.step import MODEL_KEYS
from tests.models.test_attention import packed_segments, qkv


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(attn, "SPLASH_INTERPRET", True)


def packed_turns(seg: np.ndarray, seed: int, most: int = 3) -> np.ndarray:
    """Turn ids for segment ids [B, L]: each segment split into up to `most` turns (0 first,
    restarting per segment), padding turn 0."""
    rng = np.random.default_rng(seed)
    turns = np.zeros_like(seg)
    for i in range(seg.shape[0]):
        for s in set(seg[i].tolist()) - {0}:
            (where,) = np.nonzero(seg[i] == s)
            cuts = np.sort(rng.choice(np.arange(1, len(where)), min(most, len(where)) - 1,
                                      replace=False))
            turns[i, where] = np.searchsorted(cuts, np.arange(len(where)), side="right")
    return turns


def run(impl: str, q, k, v, seg, turns, kv_seg=None, kv_turns=None, max_turns=4):
    f = jax.jit(lambda q, k, v: attn.attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=kv_seg, q_turn_ids=turns,
        kv_turn_ids=kv_turns, max_turns=max_turns, impl=impl))
    return np.asarray(f(q, k, v))


# --- (a) The mask of a template sample ----------------------------------------------------------

# Query group (rows) x key group (columns): system, user 1, answer 1, user 2, answer 2, user 3,
# answer 3, padding. Earlier turns visible, later ones not, padding never.
GROUP_MASK = np.array([
    [1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
], bool)


def test_mask_of_a_three_turn_sample_with_system_prompt_and_padding():
    tok = load_demo_tokenizer()
    turns = [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yes"},
             {"from": "human", "value": "Why"}, {"from": "gpt", "value": "No"},
             {"from": "human", "value": "Ok"}, {"from": "gpt", "value": "Go"}]
    enc = llava_llada(tok, turns, [2], system="Be")
    n, pad = len(enc.tokens), 5
    # Groups start at BOS and at every header but the system's; padding follows.
    headers = np.flatnonzero(enc.tokens == tok.start_header_id)
    assert len(headers) == 7
    bounds = [0, *headers[1:].tolist(), n, n + pad]
    seg = np.pad(np.ones(n, np.int32), (0, pad))[None]
    turn = np.pad(enc.turn_ids, (0, pad))[None]
    groups = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    assert [set(turn[0, g].tolist()) for g in groups] == [{0}, {0}, {0}, {1}, {1}, {2}, {2}, {0}]
    mask = np.asarray(attn.conversation_mask(seg, seg, turn, turn))[0, 0]
    for r, gq in enumerate(groups):
        for c, gk in enumerate(groups):
            block = mask[gq, gk]
            assert (block == GROUP_MASK[r, c]).all(), (r, c)
    # The inference prompt of the same dialogue's first two exchanges: the answer to come
    # belongs to the last turn, the header it follows is in it already.
    prompt = encode_chat_prompt(tok, turns[:3], [2], system="Be")
    np.testing.assert_array_equal(prompt.turn_ids[: headers[3]], enc.turn_ids[: headers[3]])
    assert set(prompt.turn_ids[headers[3]:].tolist()) == {1}


# --- (b) xla, splash, chunked and cudnn agree ---------------------------------------------------


def numpy_conversation(q, k, v, q_seg, kv_seg, q_turn, kv_turn) -> np.ndarray:
    """Softmax attention in float64 under the literal rule (turn(j) <= turn(i), same segment,
    key not padding); rows that see nothing are NaN."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    visible = ((q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
               & (kv_turn[:, None, :] <= q_turn[:, :, None]))
    logits = np.where(visible[:, None], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize(("length", "hkv"), [(200, 2), (256, 4)])
def test_xla_splash_and_chunked_match_numpy(interpret, length, hkv):
    q, k, v = qkv(2, length, length, 4, hkv, 64, seed=length)
    seg = packed_segments(2, length, seed=hkv)
    turns = packed_turns(seg, seed=hkv)
    assert turns.max() == 2 and (turns[seg == 0] == 0).all()
    want = numpy_conversation(q, k, v, seg, seg, turns, turns)
    real = seg > 0
    for impl in ("xla", "splash", "chunked"):
        got = run(impl, q, k, v, seg, turns)
        np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0, err_msg=impl)
        assert np.isfinite(got).all()
    # A chunk of queries against the whole sequence (the sampler's cached path).
    part = slice(64, 96)
    want = numpy_conversation(q[:, part], k, v, seg[:, part], seg, turns[:, part], turns)
    for impl in ("xla", "splash", "chunked"):
        got = run(impl, q[:, part], k, v, seg[:, part], turns[:, part], seg, turns)
        np.testing.assert_allclose(got[real[:, part]], want[real[:, part]], atol=1e-5, rtol=0)


def test_splash_passes_are_bounded_by_max_turns_not_the_data(interpret):
    """Turns present (0..2) decide the result; a larger static bound changes nothing."""
    q, k, v = qkv(2, 136, 136, 4, 2, 32, seed=1)
    seg = packed_segments(2, 136, seed=1)
    turns = packed_turns(seg, seed=1)
    real = seg > 0
    a, b = run("splash", q, k, v, seg, turns, max_turns=3), run("splash", q, k, v, seg, turns,
                                                                 max_turns=32)
    np.testing.assert_array_equal(a[real], b[real])
    jaxpr = str(jax.make_jaxpr(lambda q: attn.attention(
        q, k, v, q_segment_ids=seg, q_turn_ids=turns, max_turns=3, impl="splash"))(q))
    assert "pallas_call" in jaxpr and "cond" in jaxpr


def test_splash_gradients_match_xla(interpret):
    q, k, v = qkv(2, 200, 200, 4, 2, 64, seed=5)
    seg = packed_segments(2, 200, seed=5)
    turns = packed_turns(seg, seed=5)
    w = np.random.default_rng(6).normal(size=q.shape).astype(np.float32)
    w *= (seg > 0)[..., None, None]  # padding rows are unspecified

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(attn.attention(
            q, k, v, q_segment_ids=seg, q_turn_ids=turns, max_turns=4, impl=impl) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads("splash"), grads("xla"), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_splash_under_a_mesh_shards_turn_ids_like_segments(interpret):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    q, k, v = qkv(4, 136, 136, 4, 2, 32, seed=7)
    seg = np.concatenate([packed_segments(2, 136, seed=8)] * 2)
    turns = packed_turns(seg, seed=8)
    turns[2:] = 0  # shards with fewer turns than others skip more passes
    want = run("xla", q, k, v, seg, turns)
    f = lambda q, k, v: attn.attention(q, k, v, q_segment_ids=seg, q_turn_ids=turns,
                                       max_turns=4, impl="splash")
    with sharding.sharding_context(mesh):
        got = np.asarray(jax.jit(f)(q, k, v))
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
    real = seg > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)


def test_cudnn_gets_the_same_boolean_mask(monkeypatch):
    """cuDNN cannot run on the CPU: the call it would get is checked instead."""
    q, k, v = qkv(2, 24, 24, 4, 2, 16)
    seg = packed_segments(2, 24, seed=0)
    turns = packed_turns(seg, seed=0)
    calls = []

    def fake(q, k, v, *, mask, implementation):
        calls.append((np.asarray(mask), implementation))
        return q

    monkeypatch.setattr(attn, "resolve_impl", lambda impl, **_: impl)
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    attn.attention(q, k, v, q_segment_ids=seg, q_turn_ids=turns, impl="cudnn")
    attn.attention(q, k, v, q_segment_ids=seg, impl="cudnn")
    (mask, impl), (plain, _) = calls
    assert impl == "cudnn" and mask.dtype == bool and mask.shape == (2, 1, 24, 24)
    np.testing.assert_array_equal(mask, attn.conversation_mask(seg, seg, turns, turns))
    np.testing.assert_array_equal(plain, attn.segment_mask(seg, seg))
    assert (mask <= plain).all() and (mask < plain).any()


# --- (c) The default is unchanged ---------------------------------------------------------------


def test_default_is_bidirectional_and_unchanged(interpret):
    cfg = ModelConfig.from_config(variants.model_config("tiny"))
    assert (cfg.attention_mask, cfg.max_turns) == ("bidirectional", 32)
    q, k, v = qkv(2, 40, 40, 4, 2, 16, seed=2)
    seg = packed_segments(2, 40, seed=2)
    today = jax.nn.dot_product_attention(q, k, v, mask=attn.segment_mask(seg, seg))
    np.testing.assert_array_equal(attn.attention(q, k, v, q_segment_ids=seg), today)
    # One turn everywhere is the bidirectional mask, exactly, by both implementations.
    zeros = np.zeros_like(seg)
    for impl in ("xla", "splash", "chunked"):
        np.testing.assert_array_equal(run(impl, q, k, v, seg, zeros), run(impl, q, k, v, seg,
                                                                           None))
    with pytest.raises(ValueError, match="unknown attention_mask 'causal'"):
        ModelConfig.from_config(variants.model_config("tiny").to_dict() | {
            "attention_mask": "causal"})
    with pytest.raises(ValueError, match="max_turns 0"):
        ModelConfig.from_config(variants.model_config("tiny").to_dict() | {"max_turns": 0})


# --- (d) The model ------------------------------------------------------------------------------


def tiny(mask: str):
    cfg = variants.model_config("tiny")
    cfg.attention_mask = mask
    return cfg


@nnx.jit
def _logits(model, batch):
    return model(**{k: batch[k] for k in MODEL_KEYS if k in batch})


def test_model_reads_turn_ids_only_under_the_conversation_mask():
    both = {m: lladav.create(tiny(m), seed=0) for m in ("bidirectional", "conversation")}
    tokens = np.random.default_rng(0).integers(0, 470, (2, 24)).astype(np.int32)
    seg = np.ones((2, 24), np.int32)
    seg[1, 20:] = 0
    two = np.zeros((2, 24), np.int32)
    two[:, 12:] = 1
    two[1, 20:] = 0
    real = seg > 0
    batch = lambda turns: dict(tokens=tokens, segment_ids=seg, turn_ids=turns)
    plain = np.asarray(_logits(both["bidirectional"], batch(two)))
    np.testing.assert_array_equal(plain, _logits(both["bidirectional"], batch(None)))
    conv = np.asarray(_logits(both["conversation"], batch(two)))
    assert not np.allclose(conv[real], plain[real], atol=1e-4)
    tol = dict(atol=1e-6, rtol=0)
    np.testing.assert_allclose(_logits(both["conversation"], batch(np.zeros_like(two))), plain,
                               **tol)
    np.testing.assert_allclose(_logits(both["conversation"], batch(None)), plain, **tol)
    # Causal by turn: the first turn does not see the second; the second sees the first.
    changed = tokens.copy()
    changed[:, 14:18] = 3
    again = np.asarray(_logits(both["conversation"], dict(batch(two), tokens=changed)))
    np.testing.assert_array_equal(again[:, :12], conv[:, :12])
    assert not np.allclose(again[:, 18:20], conv[:, 18:20], atol=1e-4)
    changed = tokens.copy()
    changed[:, 2:6] = 3
    again = np.asarray(_logits(both["conversation"], dict(batch(two), tokens=changed)))
    assert not np.allclose(again[:, 12:20], conv[:, 12:20], atol=1e-4)


# --- (e) The sampler ----------------------------------------------------------------------------


def test_cached_pass_equals_full_pass_with_turn_ids():
    """The sampler's cached passes take the chunk's turn ids and the sequence's: a chunk's
    hidden states equal the full pass's with a cache filled from the same sequence."""
    llm = LLaDA(tiny("conversation"), rngs=nnx.Rngs(2))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 470, (2, 24)))
    segments = jnp.array([[0] * 5 + [1] * 19, [1] * 24], jnp.int32)  # row 0 left-padded
    turns = jnp.array([[0] * 12 + [1] * 6 + [2] * 6, [0] * 8 + [1] * 16], jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segments, 1) - 1, 0)

    @nnx.jit
    def passes(llm, tokens):
        embeds = llm.embed(tokens)
        full = llm.hidden_states(embeds, positions, segments, turn_ids=turns)
        cache = llm.init_cache(2, 24, embeds.dtype)
        _, cache = llm.cached_hidden_states(embeds, positions, segments, cache, 0, segments,
                                            turns, turns)
        part = llm.cached_hidden_states(embeds[:, 8:20], positions[:, 8:20],
                                        segments[:, 8:20], cache, 8, segments,
                                        turns[:, 8:20], turns)[0]
        return full, part

    full, part = passes(llm, tokens)
    np.testing.assert_allclose(part, full[:, 8:20], atol=1e-5, rtol=0)
    bidirectional = nnx.jit(lambda m, e: m.hidden_states(e, positions, segments))(
        llm, llm.embed(tokens))
    assert not np.allclose(full[:, 8:20], bidirectional[:, 8:20], atol=1e-4)


@functools.partial(nnx.jit, static_argnames=("options", "ids"))
def _generate(model, prompt, rng, options, ids):
    return sampler.generate(model, prompt, options, ids, rng)


def sharpened(model):
    """Parameters x10: logits far from uniform, so argmaxes vary (a random init's are flat)."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 10, state))
    return model


def test_sampler_with_turn_ids():
    tok = load_demo_tokenizer()
    ids = SpecialIds.from_tokenizer(tok)
    model = sharpened(lladav.create(tiny("conversation"), seed=1))
    convs = ([{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Yes"},
              {"from": "human", "value": "Why"}],
             [{"from": "human", "value": "Count"}])
    encs = [encode_chat_prompt(tok, c, system="Be") for c in convs]
    p = max(len(e.tokens) for e in encs)
    prompt = dict(tokens=np.full((2, p), tok.pad_id, np.int32), valid=np.zeros((2, p), bool),
                  turn_ids=np.zeros((2, p), np.int32))
    for i, e in enumerate(encs):
        prompt["tokens"][i, p - len(e.tokens):] = e.tokens
        prompt["valid"][i, p - len(e.tokens):] = True
        prompt["turn_ids"][i, p - len(e.tokens):] = e.turn_ids
    assert prompt["turn_ids"][:, -1].tolist() == [1, 0]
    np.testing.assert_array_equal(sampler.answer_turns(prompt["turn_ids"], 3)[:, p:],
                                  [[1, 1, 1], [0, 0, 0]])

    def run(prompt, **options):
        out = _generate(model, prompt, jax.random.key(0), options=SamplerOptions(**options),
                        ids=ids)
        return {k: np.asarray(v) for k, v in out.items()}

    # One step per block: no cache is ever stale, every mode is exact.
    options = dict(gen_length=8, block_length=4, steps=2)
    none = run(prompt, cache="none", **options)
    np.testing.assert_array_equal(run(prompt, cache="prefix", **options)["tokens"],
                                  none["tokens"])
    # The turn ids are read: without them the 2-turn row decodes otherwise, the 1-turn row
    # (one turn is the bidirectional mask) the same.
    plain = run({k: v for k, v in prompt.items() if k != "turn_ids"}, cache="none", **options)
    np.testing.assert_array_equal(plain["tokens"][1], none["tokens"][1])
    assert (plain["tokens"][0] != none["tokens"][0]).any()
    # Guidance's unconditional rows take the turn ids too.
    guided = run(prompt, cache="none", cfg_scale=1.0, **options)
    assert guided["tokens"].shape == (2, 8)


def test_api_takes_conversations_and_refuses_too_many_turns():
    cfg = tiny("conversation")
    cfg.max_turns = 2
    m = api.Model(lladav.create(cfg, seed=0), cfg, load_demo_tokenizer())
    two = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes"},
           {"from": "human", "value": "Why"}]
    prompts = [m._encode(None, p, "Be") for p in (two, "Count")]
    batch = m._collate(prompts, 8)
    p_len = batch["tokens"].shape[1]
    for row, p in zip(batch["turn_ids"], prompts, strict=True):
        np.testing.assert_array_equal(row[p_len - len(p.tokens):], p.turn_ids)
        assert not row[: p_len - len(p.tokens)].any()  # left padding 0
    assert batch["turn_ids"][:, -1].tolist() == [1, 0]
    out = m.generate_batch([(None, two), (None, "Count")], gen_length=8, block_length=8, steps=1)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    three = [*two, {"from": "gpt", "value": "No"}, {"from": "human", "value": "Ok"}]
    with pytest.raises(ValueError, match="has 3 turns; the model takes at most max_turns=2"):
        m.generate(None, three)
    # A bidirectional model gets no turn ids.
    plain = api.Model(m.module, variants.model_config("tiny"), m.tokenizer)
    assert "turn_ids" not in plain._collate([plain._encode(None, three, "Be")], 8)
