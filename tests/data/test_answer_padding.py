"""EOS padding after the answer (`data.answer_window`, docs/design.md §4.5), spelled out: where
it starts, how far it goes, what it is (targets, the answer's turn), and that planning, packing
and the answer span see it."""

import numpy as np
import pytest

from lladav_jax.data import pipeline
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.featurize import Featurizer, sample_window
from lladav_jax.data.synthetic import SyntheticSource
from lladav_jax.data.template import answer_start, fit_answer, llava_llada, plain
from lladav_jax.models.variants import model_config
from lladav_jax.train.validation import answer_span

TURNS = [{"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "yes"},
         {"from": "human", "value": "And blue?"}, {"from": "gpt", "value": "no it is green"}]


@pytest.fixture(scope="module")
def tok():
    return load_demo_tokenizer()


def test_fit_answer_llava_llada(tok):
    enc = llava_llada(tok, TURNS, system="Be brief.")
    n = len(enc.tokens)
    start = answer_start(enc.tokens, enc.targets, tok.end_header_id)
    # The region starts after the last assistant header: blank line, answer, <|eot_id|>.
    assert enc.tokens[start - 1] == tok.end_header_id
    assert tok.decode(enc.tokens[start:n - 1].tolist()).strip() == "no it is green"
    assert enc.tokens[n - 1] == tok.eot_id
    used = n - start
    tokens, targets, turns = fit_answer(enc.tokens, enc.targets, enc.turn_ids, tok.eos_id,
                                        tok.end_header_id, window=used + 5, limit=1000)
    assert len(tokens) == n + 5
    np.testing.assert_array_equal(tokens[:n], enc.tokens)
    assert (tokens[n:] == tok.eos_id).all() and targets[n:].all()
    np.testing.assert_array_equal(targets[:n], enc.targets)
    assert (turns[n:] == enc.turn_ids[-1]).all() and enc.turn_ids[-1] == 1
    # The limit (seq_len) caps it; a window the answer fills exactly adds nothing.
    assert len(fit_answer(enc.tokens, enc.targets, enc.turn_ids, tok.eos_id,
                          tok.end_header_id, used + 5, n + 2)[0]) == n + 2
    assert len(fit_answer(enc.tokens, enc.targets, enc.turn_ids, tok.eos_id,
                          tok.end_header_id, used, 1000)[0]) == n
    # A shorter window cuts the answer at its edge: the blank line and the first two tokens,
    # still targets, no <|eot_id|> (what a 2-token gen_length shows of this answer).
    tokens, targets, turns = fit_answer(enc.tokens, enc.targets, enc.turn_ids, tok.eos_id,
                                        tok.end_header_id, 3, 1000)
    assert len(tokens) == start + 3 and targets[start:].all()
    np.testing.assert_array_equal(tokens, enc.tokens[: start + 3])
    assert tok.decode(tokens[start:].tolist()).strip() == tok.decode(
        enc.tokens[start + 1 : start + 3].tolist()).strip()


def test_fit_answer_plain(tok):
    enc = plain(tok, [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a cat"}],
                [4])
    start = answer_start(enc.tokens, enc.targets, tok.end_header_id)
    assert start == 4  # after the image placeholders: the caption
    tokens, targets, _ = fit_answer(enc.tokens, enc.targets, enc.turn_ids, tok.eos_id,
                                    tok.end_header_id, window=12, limit=100)
    assert len(tokens) == start + 12 and targets[start:].all()


def test_featurizer_pads_and_the_answer_span_skips_it(tok):
    cfg = model_config("tiny")
    cfg.image.aspect_ratio, cfg.image.max_tiles = "plain", 2  # 2: a packed row of two
    source = SyntheticSource(50, split="test", seed=0)
    raw = next(source[i] for i in range(50) if sample_window(source[i]["id"], 40) >= 30)
    plain_ex = Featurizer(cfg, tok, seq_len=64, system="Answer in one word.")(raw)
    padded = Featurizer(cfg, tok, seq_len=64, system="Answer in one word.",
                        answer_window=40)(raw)
    n = len(plain_ex.tokens)
    start = answer_start(plain_ex.tokens, plain_ex.targets, tok.end_header_id)
    window = sample_window(raw["id"], 40)
    assert window > n - start  # this sample's window adds padding...
    assert len(padded.tokens) == min(start + window, 64)  # ...up to seq_len at most
    assert len(padded.tokens) > n
    np.testing.assert_array_equal(padded.tokens[:n], plain_ex.tokens)
    assert (padded.tokens[n:] == tok.eos_id).all() and padded.targets[n:].all()
    assert answer_span(padded, tok) == answer_span(plain_ex, tok)
    # A measured sample is as long as its featurized one: plans count the padding.
    wide = Featurizer(cfg, tok, seq_len=256, system="Answer in one word.", answer_window=20)
    measured = wide.measure(raw)
    assert len(measured.tokens) == len(wide(raw).tokens) < 256
    # Packed rows keep each sample's padding inside its own segment, visible and targeted.
    row = pipeline.Row((wide(raw), wide(source[0])))
    batch = pipeline.collate([row], 1, 256, cfg, tok.pad_id)
    first = len(measured.tokens)
    assert batch["segment_ids"][0, first - 1] == 1 and batch["segment_ids"][0, first] == 2
    assert batch["targets"][0, first - 1] and batch["tokens"][0, first - 1] == tok.eos_id
    with pytest.raises(ValueError, match="answer_window"):
        Featurizer(cfg, tok, answer_window=-1)


def test_windows_spread_over_scales_and_stay_put(tok):
    """Each sample's window is fixed by its id (the same in the measure and featurize passes,
    in every epoch) and spread log-uniformly over 1..answer_window: short windows, where the
    answer ends at the edge, and long ones, where EOS fills most of it."""
    windows = np.array([sample_window(f"s{i}", 130) for i in range(4000)])
    assert windows.min() == 2 and windows.max() == 130
    assert sample_window("s7", 130) == sample_window("s7", 130)
    for low, high in ((2, 4), (5, 16), (17, 64), (65, 130)):  # ~ln(high / low) / ln(65)
        share = np.mean((windows >= low) & (windows <= high))
        assert 0.5 * np.log((high + 0.5) / (low - 0.5)) / np.log(65) < share, (low, high)
    cfg = model_config("tiny")
    cfg.image.aspect_ratio, cfg.image.max_tiles = "plain", 1
    source = SyntheticSource(50, split="test", seed=0)
    feat = Featurizer(cfg, tok, seq_len=256, system="Answer in one word.", answer_window=130)
    for i in range(50):
        raw = source[i]
        ex = feat(raw)
        start = answer_start(ex.tokens, ex.targets, tok.end_header_id)
        assert len(ex.tokens) - start == sample_window(raw["id"], 130)  # padded or cut
        assert len(feat.measure(raw).tokens) == len(ex.tokens)
