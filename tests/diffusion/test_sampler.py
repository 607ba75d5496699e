"""The LLaDA sampler (docs/design.md §5.1-5.3) against a plain PyTorch reference, and its parts.

The reference (lladav_jax/checkpoints/torch_reference.py) runs transformers' LLaVA-OneVision set
up as LLaDA-V with the same random weights as our model; at temperature 0 with `low_confidence`
and no cache the generated ids must be equal. Prompts come from the chat template with images
(and one without), left-padded to a batch.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from lladav_jax.checkpoints import torch_reference
from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.image import process_image
from lladav_jax.data.layout import collate_visual
from lladav_jax.data.template import encode_prompt
from lladav_jax.diffusion import sampler, unmasking
from lladav_jax.diffusion.options import CACHES, SamplerOptions, SpecialIds
from lladav_jax.models import hf_params, lladav, variants
from tests.close import assert_close

SCALE = 0.3  # weights large enough that argmaxes vary from position to position
EOT_BIAS = 16.0  # raises <|eot_id|>'s logit by about this much where the answer is still masked
STRONG_EOT_BIAS = 25.0  # every row stops
SHARPEN = 3.0  # lm_head x3: confident predictions, for threshold decoding
QUESTIONS = (  # (question, image size or None): three prompt lengths
    ("What color is it?", (60, 40)),
    ("Where is the big square on the left of the picture?", (30, 70)),
    ("Count the dots.", None),
)


def picture(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def make_prompt(rows, cfg, pad_id, length: int | None = None):
    """rows: (tokens, ProcessedImage | None, image start) -> our prompt dict, left-padded to
    `length` (default: the longest row), and the reference's (tokens, valid, images)."""
    b, p = len(rows), length or max(len(t) for t, _, _ in rows)
    tokens = np.full((b, p), pad_id, np.int32)
    valid = np.zeros((b, p), bool)
    samples = []
    for i, (t, img, start) in enumerate(rows):
        tokens[i, p - len(t):], valid[i, p - len(t):] = t, True
        samples.append([] if img is None else [(img, p - len(t) + start)])
    visual = collate_visual(samples, cfg, p)
    is_image = np.zeros((b, p), bool)
    for i in range(b):
        pos = visual["visual_pos"][i]
        is_image[i, pos[pos < p]] = True
    with_image = [i for i, (_, img, _) in enumerate(rows) if img is not None]
    images = None
    if with_image:
        pixels = torch.from_numpy(visual["pixels"][with_image].transpose(0, 1, 4, 2, 3).copy())
        sizes = torch.tensor([[rows[i][1].size[1], rows[i][1].size[0]] for i in with_image])
        images = (pixels, sizes, is_image)
    return dict(tokens=tokens, valid=valid, **visual), (tokens, valid, images)


def eot_biased(hf, tok, bias: float, token: int | None = None):
    """A copy whose <|eot_id|> (or `token`) head row gains `bias` * h / |h|^2, h the hidden
    state of an all-mask sequence (the same at every position): a still-masked answer position
    gets about `bias` more on that token."""
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        emb = hf.get_input_embeddings()(torch.full((1, 8), tok.mask_id))
        h = hf.model.language_model(
            inputs_embeds=emb, attention_mask=ref.bidirectional_mask(np.ones((1, 8), np.int32))
        ).last_hidden_state[0, 0]
        hf.lm_head.weight[tok.eot_id if token is None else token] += bias * h / (h @ h)
    return hf


@pytest.fixture(scope="module")
def world():
    cfg = variants.model_config("tiny")
    tok = load_demo_tokenizer()
    ids = SpecialIds.from_tokenizer(tok)
    base = ref.randomize(
        transformers.LlavaOnevisionForConditionalGeneration(ref.onevision_config(cfg)),
        scale=SCALE,
    )
    with torch.no_grad():  # a trained model never predicts the mask; here it cannot either
        base.lm_head.weight[tok.mask_id] = 0
    sharp = copy.deepcopy(base)
    with torch.no_grad():
        sharp.lm_head.weight *= SHARPEN
    hf = {"base": base, "eot": eot_biased(base, tok, EOT_BIAS),
          "eot_strong": eot_biased(base, tok, STRONG_EOT_BIAS), "sharp": sharp,
          "eos": eot_biased(base, tok, STRONG_EOT_BIAS, token=tok.eos_id)}
    ours = {}
    for name, model in hf.items():
        ours[name] = lladav.abstract(cfg)  # shapes only: load_hf fills every parameter
        hf_params.load_hf(ours[name], ref.official_from_onevision(model, cfg),
                        hf_params.lladav_entries(cfg), cfg)
    rows = []
    for k, (question, size) in enumerate(QUESTIONS):
        img = None if size is None else process_image(picture(*size, seed=k), cfg)
        t, starts = encode_prompt(tok, question, [] if img is None else [img.layout.num_tokens])
        rows.append((t, img, starts[0] if starts else None))
    assert len({len(t) for t, _, _ in rows}) == len(rows)  # three different lengths
    prompt, hf_prompt = make_prompt(rows, cfg, tok.pad_id)
    return dict(cfg=cfg, tok=tok, ids=ids, hf=hf, ours=ours, rows=rows, prompt=prompt,
                hf_prompt=hf_prompt)


@functools.partial(nnx.jit, static_argnames=("options", "ids"))
def _generate(model, prompt, rng, options, ids):
    return sampler.generate(model, prompt, options, ids, rng)


def run(world, model: str, prompt=None, seed: int = 0, **options) -> dict:
    """Our sampler (one jitted function: compiled once per options and shapes)."""
    prompt = world["prompt"] if prompt is None else prompt
    out = _generate(world["ours"][model], prompt, jax.random.key(seed),
                    options=SamplerOptions(**options), ids=world["ids"])
    return {k: np.asarray(v) for k, v in out.items()}


def stopped(tokens: np.ndarray, ids: SpecialIds) -> np.ndarray:
    return np.asarray(unmasking.rows_done(jnp.asarray(tokens), ids))


def check_valid(out: dict, ids: SpecialIds, vocab: int) -> None:
    """Ids in range and never forbidden; a mask exactly where nothing was committed; masks
    left only in rows that stopped, and only after their first <|eot_id|>."""
    tokens, at = out["tokens"], out["committed_at"]
    assert ((tokens >= 0) & (tokens < vocab)).all()
    assert not np.isin(tokens, ids.forbidden).any()
    np.testing.assert_array_equal(at == -1, tokens == ids.mask)
    assert ((at >= -1) & (at < out["steps"])).all()
    done = stopped(tokens, ids)
    for row, is_done in zip(tokens, done):
        if is_done:
            first = int(np.argmax(row == ids.eot))
            assert not (row[:first] == ids.mask).any()
        else:
            assert not (row == ids.mask).any()


# --- Against the PyTorch reference ------------------------------------------------------------

REFERENCE_CASES = [  # gen_length, block_length, steps, cfg_scale, model
    (16, 16, 16, 0.0, "base"),
    (16, 8, 6, 1.0, "base"),  # 3 steps per block of 8: 3, 3, 2 (remainder first)
    (24, 8, 9, 0.5, "base"),
    (20, 10, 8, 0.0, "eot"),  # 4 steps per block of 10: 3, 3, 2, 2; rows stop at <|eot_id|>
    (20, 10, 8, 0.0, "eot_strong"),  # every row stops: the loop ends early
]


@pytest.mark.parametrize("gen,block,steps,cfg_scale,model", REFERENCE_CASES)
def test_matches_pytorch_reference(world, gen, block, steps, cfg_scale, model):
    ids = world["ids"]
    options = dict(gen_length=gen, block_length=block, steps=steps, cfg_scale=cfg_scale)
    ours = run(world, model, **options)
    tokens, valid, images = world["hf_prompt"]
    want = torch_reference.generate(
        world["hf"][model], tokens, valid, images=images, mask_id=ids.mask, eot_id=ids.eot,
        forbidden=ids.forbidden, **options,
    )
    # Our logits differ from transformers' by ~1e-6: every decision must be clearer than that.
    assert want["margin"] > 1e-5, f"an ill-conditioned case: margin {want['margin']}"
    np.testing.assert_array_equal(ours["tokens"], want["tokens"])
    np.testing.assert_array_equal(ours["committed_at"], want["committed_at"])
    assert int(ours["steps"]) == want["steps"]
    answers = ours["tokens"][ours["tokens"] != ids.mask]
    assert len(np.unique(answers)) > gen // 2  # not one id everywhere: the test has teeth
    check_valid(ours, ids, world["cfg"].text.vocab_size)
    done = stopped(ours["tokens"], ids)
    if model == "eot":  # some rows stop early (masks left after <|eot_id|>), not all
        assert done.any() and not done.all()
        assert (ours["tokens"][done] == ids.mask).any()
        assert int(ours["steps"]) == steps
    elif model == "eot_strong":  # all rows stop, and so does the loop
        assert done.all() and (ours["tokens"] == ids.mask).any(axis=1).all()
        assert int(ours["steps"]) < steps
    else:
        assert not done.any() and int(ours["steps"]) == steps


# --- Batching -----------------------------------------------------------------------------------


FAST = dict(gen_length=24, block_length=8, steps=12, cache="dual", threshold=0.9)


@pytest.mark.parametrize("model,options", [
    ("eot", dict(gen_length=20, block_length=10, steps=8)),
    ("sharp", FAST),
])
@pytest.mark.slow
def test_batch_equals_each_prompt_alone(world, model, options):
    """Each row of the batch decodes as it does alone: in a batch of one with as much left
    padding, and (the shortest prompt) with no padding at all."""
    batch = run(world, model, **options)
    rows, cfg, pad = world["rows"], world["cfg"], world["tok"].pad_id
    width = world["prompt"]["tokens"].shape[1]
    shortest = min(range(len(rows)), key=lambda i: len(rows[i][0]))
    alone = [(i, make_prompt([row], cfg, pad, width)[0]) for i, row in enumerate(rows)]
    alone.append((shortest, make_prompt([rows[shortest]], cfg, pad)[0]))
    assert alone[-1][1]["tokens"].shape[1] < width
    for i, prompt in alone:
        got = run(world, model, prompt, **options)
        np.testing.assert_array_equal(got["tokens"][0], batch["tokens"][i])
        if options.get("threshold") is None:  # the same steps in a batch as alone
            np.testing.assert_array_equal(got["committed_at"][0], batch["committed_at"][i])


# --- Parts ----------------------------------------------------------------------------------------


def test_num_transfer_tokens_remainder_first():
    counts = np.array([10, 7, 3, 0, 8])
    got = np.asarray(unmasking.num_transfer_tokens(jnp.asarray(counts), 4))
    np.testing.assert_array_equal(
        got, [[3, 3, 2, 2], [2, 2, 2, 1], [1, 1, 1, 0], [0, 0, 0, 0], [2, 2, 2, 2]])
    np.testing.assert_array_equal(got.sum(1), counts)
    mask = torch.arange(10)[None] < torch.tensor(counts)[:, None]
    np.testing.assert_array_equal(got, torch_reference.get_num_transfer_tokens(mask, 4).numpy())


def test_select_top_k_and_threshold():
    inf = -jnp.inf
    conf = jnp.array([
        [0.2, 0.9, inf, 0.5, 0.1],
        [0.3, 0.3, 0.3, inf, inf],  # ties: the first positions win
        [inf, inf, inf, inf, inf],  # nothing masked: nothing committed
        [0.95, 0.2, 0.91, 0.9, inf],
    ])
    got = np.asarray(unmasking.select(conf, jnp.array([2, 2, 3, 1]), None))
    np.testing.assert_array_equal(got, [
        [0, 1, 0, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    # k beyond the finite entries commits only those.
    got = np.asarray(unmasking.select(conf, jnp.array([5, 5, 5, 5]), None))
    np.testing.assert_array_equal(got, np.isfinite(np.asarray(conf)))
    # Threshold: every position at or above it, and the most confident one in any case.
    got = np.asarray(unmasking.select(conf, jnp.zeros(4, jnp.int32), 0.9))
    np.testing.assert_array_equal(got, [
        [0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]])


def test_rows_done():
    ids = SpecialIds(mask=9, eot=7, forbidden=(1, 2))
    gen = jnp.array([
        [3, 4, 5, 6, 5, 4],  # no <|eot_id|>
        [3, 9, 5, 7, 9, 9],  # a mask before it
        [3, 4, 5, 7, 9, 9],  # done: masks only after it
        [7, 9, 9, 9, 9, 9],  # done at once
        [3, 4, 7, 9, 7, 9],  # a mask between two eots counts as after the first
        [9, 9, 9, 9, 9, 7],  # eot last, everything before still masked
    ])
    np.testing.assert_array_equal(np.asarray(unmasking.rows_done(gen, ids)),
                                  [False, False, True, True, True, False])


def test_rows_done_at_eos():
    """EOS ends a row like <|eot_id|> (it is only ever committed under allow_eos)."""
    ids = SpecialIds(mask=9, eot=7, forbidden=(1, 2, 8), eos=8)
    gen = jnp.array([[3, 8, 9, 9], [9, 8, 8, 8], [3, 4, 8, 7]])
    np.testing.assert_array_equal(np.asarray(unmasking.rows_done(gen, ids)), [True, False, True])
    assert ids.forbidden_for(SamplerOptions()) == (1, 2, 8)
    assert ids.forbidden_for(SamplerOptions(allow_eos=True)) == (1, 2)


def test_end_last():
    """Under allow_eos an end token ranks below everything else until nothing before it is
    masked; the first masked position is never held back."""
    ids = SpecialIds(mask=9, eot=7, forbidden=(1, 2, 8), eos=8)
    conf = jnp.array([[0.5, 0.9, 0.99, 0.6], [-jnp.inf, 0.8, 0.3, 0.95]])
    x0 = jnp.array([[3, 4, 8, 7], [5, 7, 4, 8]])
    masked = jnp.array([[True, True, True, True], [False, True, True, True]])
    got = np.asarray(unmasking.end_last(conf, x0, masked, ids))
    np.testing.assert_allclose(got, [[0.5, 0.9, -0.01, -0.4], [-np.inf, 0.8, 0.3, -0.05]],
                               atol=1e-6)
    # One commit a step: the row is spelt left to right where the ends would have gone first.
    picked = np.asarray(unmasking.select(jnp.asarray(got), jnp.ones(2, jnp.int32), None))
    np.testing.assert_array_equal(picked, [[0, 1, 0, 0], [0, 1, 0, 0]])


def test_allow_eos(world):
    """A model that favours EOS at masked positions: the official rule never commits it;
    allow_eos lets it fill the window, and a row stops once nothing before its first EOS is
    masked. The reference (the official sampler) refuses the option."""
    ids, vocab, eos = world["ids"], world["cfg"].text.vocab_size, world["tok"].eos_id
    options = dict(gen_length=20, block_length=10, steps=10)
    official = run(world, "eos", **options)
    check_valid(official, ids, vocab)
    assert not (official["tokens"] == eos).any()
    out = run(world, "eos", allow_eos=True, **options)
    tokens = out["tokens"]
    assert (tokens == eos).any()  # EOS is committed now...
    ended = ((tokens == eos) | (tokens == ids.eot)).any(axis=1)
    np.testing.assert_array_equal(stopped(tokens, ids), ended)  # ...and ends its row
    for row in tokens[ended]:  # end tokens go last: nothing masked before the first one
        first = int(np.argmax((row == eos) | (row == ids.eot)))
        assert not (row[:first] == ids.mask).any()
    assert not np.isin(tokens, [i for i in ids.forbidden if i != eos]).any()
    with pytest.raises(ValueError, match="allow_eos"):
        torch_reference.generate(world["hf"]["base"], *world["hf_prompt"][:2],
                                 mask_id=ids.mask, eot_id=ids.eot, forbidden=ids.forbidden,
                                 allow_eos=True, **options)


def test_cached_pass_equals_full_pass(world):
    """The cache machinery itself is exact: with a cache filled from the same sequence, a
    chunk's hidden states equal the full pass's (the caches' only error is staleness)."""
    llm = world["ours"]["base"].llm
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 470, (2, 24)))
    segments = jnp.array([[0] * 5 + [1] * 19, [1] * 24], jnp.int32)  # row 0 left-padded
    positions = jnp.maximum(jnp.cumsum(segments, 1) - 1, 0)
    chunks = ((8, 4), (16, 8))

    @nnx.jit
    def passes(llm, tokens):
        embeds = llm.embed(tokens)
        full = llm.hidden_states(embeds, positions, segments)
        cache = llm.init_cache(2, 24, embeds.dtype)
        fresh, cache = llm.cached_hidden_states(embeds, positions, segments, cache, 0, segments)
        parts = [llm.cached_hidden_states(embeds[:, a:a + n], positions[:, a:a + n],
                                          segments[:, a:a + n], cache, a, segments)[0]
                 for a, n in chunks]
        return full, fresh, parts

    full, fresh, parts = passes(llm, tokens)
    valid = np.asarray(segments) > 0
    assert_close(np.asarray(fresh)[valid], np.asarray(full)[valid])
    for (a, n), part in zip(chunks, parts):
        assert_close(part, full[:, a:a + n])


# --- Caches and parallel decoding -----------------------------------------------------------------


@pytest.mark.slow
def test_one_step_per_block_every_cache_is_exact(world):
    """A block's first step is a full pass in every mode: with one step per block the caches
    are never stale and every mode gives the uncached result."""
    options = dict(gen_length=16, block_length=8, steps=2)
    none = run(world, "base", cache="none", **options)
    for cache in ("prefix", "dual"):
        got = run(world, "base", cache=cache, **options)
        np.testing.assert_array_equal(got["tokens"], none["tokens"])
        np.testing.assert_array_equal(got["committed_at"], none["committed_at"])


@pytest.mark.slow
def test_cache_modes_and_threshold(world):
    """Every mode decodes validly; the first step of the first block (a full pass over the
    same sequence) commits the same tokens in every mode; later steps may differ (prefix and
    dual reuse stale keys/values: Fast-dLLM's approximation). Threshold decoding commits
    several tokens per step on a confident model."""
    ids, vocab = world["ids"], world["cfg"].text.vocab_size
    options = {k: v for k, v in FAST.items() if k not in ("cache", "threshold")}
    outs = {c: run(world, "sharp", cache=c, **options) for c in CACHES}
    for cache, out in outs.items():
        check_valid(out, ids, vocab)
        assert not stopped(out["tokens"], ids).any(), cache  # no eot stop here: all decoded
        assert int(out["steps"]) == 12
        first = out["committed_at"] == 0
        np.testing.assert_array_equal(first, outs["none"]["committed_at"] == 0)
        np.testing.assert_array_equal(out["tokens"][first], outs["none"]["tokens"][first])
    fast = run(world, "sharp", **FAST)
    check_valid(fast, ids, vocab)
    assert not (fast["tokens"] == ids.mask).any()
    assert int(fast["steps"]) < options["gen_length"]
    per_step = np.bincount(fast["committed_at"].ravel(), minlength=int(fast["steps"]))
    assert (per_step >= 1).all() and per_step.max() > len(world["rows"])


# --- Sampling options, the commit record, streaming ----------------------------------------------


@pytest.mark.slow
def test_random_remasking_and_temperature(world):
    ids, vocab = world["ids"], world["cfg"].text.vocab_size
    options = dict(gen_length=16, block_length=16, steps=16)  # as the first reference case
    greedy = run(world, "base", **options)
    for extra in (dict(remasking="random"), dict(temperature=1.0)):
        a = run(world, "base", seed=1, **options, **extra)
        b = run(world, "base", seed=2, **options, **extra)
        again = run(world, "base", seed=1, **options, **extra)
        for out in (a, b):
            check_valid(out, ids, vocab)
        np.testing.assert_array_equal(a["tokens"], again["tokens"])  # the rng decides
        assert (a["tokens"] != greedy["tokens"]).any(), extra
        assert (a["committed_at"] != b["committed_at"]).any() or (
            a["tokens"] != b["tokens"]).any(), extra


def test_on_block_and_committed_at(world):
    """`compiled_generate` calls on_block once per block with the answer so far, and
    committed_at records, per block, the block's steps with the scheduled counts."""
    ids = world["ids"]
    calls = []
    options = SamplerOptions(gen_length=24, block_length=8, steps=6, cache="dual",
                             cfg_scale=0.5)
    f = sampler.compiled_generate(world["ours"]["base"], options, ids,
                                  on_block=lambda b, t: calls.append((int(b), np.asarray(t))))
    out = {k: np.asarray(v) for k, v in f(world["prompt"], jax.random.key(0)).items()}
    jax.effects_barrier()
    tokens, at = out["tokens"], out["committed_at"]
    assert [b for b, _ in calls] == [0, 1, 2]
    for b, so_far in calls:
        assert so_far.shape == tokens.shape
        np.testing.assert_array_equal(so_far[:, : 8 * (b + 1)], tokens[:, : 8 * (b + 1)])
        assert (so_far[:, 8 * (b + 1):] == ids.mask).all()
    assert not stopped(tokens, ids).any()
    check_valid(out, ids, world["cfg"].text.vocab_size)
    assert int(out["steps"]) == 6
    # Block b is committed at steps 2b, 2b + 1: four tokens each (8 masks over 2 steps).
    for b in range(3):
        blk = at[:, 8 * b: 8 * (b + 1)]
        for step in (2 * b, 2 * b + 1):
            np.testing.assert_array_equal((blk == step).sum(1), 4)
