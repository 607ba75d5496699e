"""Tokenizer and chat templates: the exact layout and target mask of docs/design.md §3.1."""

import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from lladav_jax.data import demo_tokenizer, synthetic
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.template import (
    DEFAULT_SYSTEM_PROMPT,
    encode_conversation,
    encode_prompt,
    llava_llada,
    move_image_tag_first,
    plain,
)
from lladav_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from lladav_jax.models.variants import model_config


@pytest.fixture(scope="module")
def tok():
    return load_demo_tokenizer()


def seq(*parts):
    """parts: (ids, target) pairs -> (tokens, targets) arrays."""
    ids = [i for p, _ in parts for i in p]
    tgt = [t for p, t in parts for _ in p]
    return np.asarray(ids, np.int32), np.asarray(tgt, bool)


def system_part(tok, system=DEFAULT_SYSTEM_PROMPT):
    E = tok.encode
    return [
        ([tok.bos_id, tok.start_header_id], True),
        (E("system"), False),
        ([tok.end_header_id], True),
        (E("\n\n" + system), False),
        ([tok.eot_id], True),
    ]


def test_two_turn_conversation_layout(tok):
    """The hand-written layout of docs/design.md §3.1, token by token, with its target mask."""
    turns = [
        {"from": "human", "value": "<image>\nWhat color is the shape?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And which shape is it?"},
        {"from": "gpt", "value": "a circle"},
    ]
    enc = llava_llada(tok, turns, [7])
    E, SH, EH, EOT = tok.encode, tok.start_header_id, tok.end_header_id, tok.eot_id
    PH = tok.placeholder_id
    tokens, targets = seq(
        # <|startoftext|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
        *system_part(tok),
        # <|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color is the shape?<|eot_id|>
        ([SH], True), (E("user"), False), ([EH], True), (E("\n\n"), False),
        ([PH] * 7, False), (E("\nWhat color is the shape?"), False), ([EOT], True),
        # <|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>: all targets
        ([SH], True), (E("assistant"), True), ([EH], True), (E("\n\nred"), True), ([EOT], True),
        ([SH], True), (E("user"), False), ([EH], True),
        (E("\n\nAnd which shape is it?"), False), ([EOT], True),
        ([SH], True), (E("assistant"), True), ([EH], True), (E("\n\na circle"), True),
        ([EOT], True),
    )  # fmt: skip
    np.testing.assert_array_equal(enc.tokens, tokens)
    np.testing.assert_array_equal(enc.targets, targets)
    assert enc.tokens.dtype == np.int32 and enc.targets.dtype == bool
    image_start = len(seq(*system_part(tok))[0]) + 3 + len(E("\n\n"))
    assert enc.image_starts == (image_start,)
    assert (enc.tokens[image_start : image_start + 7] == PH).all()
    # Cut points: right after each assistant <|eot_id|>.
    assert [enc.tokens[c - 1] for c in enc.cut_points] == [EOT, EOT]
    assert enc.cut_points[-1] == len(enc.tokens)
    # The text round-trips.
    text = tok.decode(enc.tokens[enc.tokens != PH])
    assert text.startswith("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nYou are")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\na circle<|eot_id|>")


def official_llada(tok, turns, counts, system=DEFAULT_SYSTEM_PROMPT):
    """The official `preprocess_llada` algorithm, re-stated: each message rendered whole with its
    chat template and tokenized by a tokenizer that knows `<image>` as a special token, BOS
    dropped after the first message; user/system messages ignored, then the structural tokens
    unmasked everywhere; then each `<image>` token expanded to its visual tokens."""
    hf = tokenizers.Tokenizer.from_str(tok.to_json())
    hf.add_special_tokens(["<image>"])
    image_id = hf.token_to_id("<image>")

    def render(role, content):
        return f"<|startoftext|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"

    ids = hf.encode(render("system", system), add_special_tokens=False).ids
    labels = [False] * len(ids)
    for turn in turns:
        role = {"human": "user", "gpt": "assistant"}[turn["from"]]
        enc = hf.encode(render(role, turn["value"]), add_special_tokens=False).ids[1:]
        ids += enc
        labels += [role == "assistant"] * len(enc)
    structural = set(tok.structural_ids)
    labels = [lab or i in structural for i, lab in zip(ids, labels)]
    out_ids, out_labels, it = [], [], iter(counts)
    for i, lab in zip(ids, labels):
        if i == image_id:
            n = next(it)
            out_ids += [tok.placeholder_id] * n
            out_labels += [False] * n
        else:
            out_ids.append(i)
            out_labels.append(lab)
    return np.asarray(out_ids), np.asarray(out_labels)


@pytest.mark.parametrize(
    "turns,counts",
    [
        (
            [
                {"from": "human", "value": "<image>\nWhat color is the shape? /think"},
                {"from": "gpt", "value": "It is red.\n\nRed."},
                {"from": "human", "value": "Compare <image> with <image>, please.\n"},
                {"from": "gpt", "value": " The second one is bigger "},
            ],
            [4, 9, 2],
        ),
        ([{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}], []),
    ],
)
def test_matches_official_algorithm(tok, turns, counts):
    enc = llava_llada(tok, turns, counts)
    ids, labels = official_llada(tok, turns, counts)
    np.testing.assert_array_equal(enc.tokens, ids)
    np.testing.assert_array_equal(enc.targets, labels)


def test_multi_image_placeholders(tok):
    turns = [
        {"from": "human", "value": "<image>\n<image>\nWhich image is brighter?"},
        {"from": "gpt", "value": "the first"},
        {"from": "human", "value": "And this one? <image>"},
        {"from": "gpt", "value": "darker"},
    ]
    counts = [3, 5, 2]
    enc = llava_llada(tok, turns, counts)
    assert len(enc.image_starts) == 3
    starts = enc.image_starts
    assert starts[0] < starts[1] < starts[2]
    for s, n in zip(starts, counts):
        assert (enc.tokens[s : s + n] == tok.placeholder_id).all()
        assert not enc.targets[s : s + n].any()
    # The two images of the first turn are separated by exactly the "\n" between them.
    between = enc.tokens[starts[0] + counts[0] : starts[1]]
    np.testing.assert_array_equal(between, tok.encode("\n"))
    assert (enc.tokens == tok.placeholder_id).sum() == sum(counts)


def test_image_count_must_match(tok):
    turns = [{"from": "human", "value": "<image>\n<image>"}, {"from": "gpt", "value": "x"}]
    with pytest.raises(ValueError, match="more <image> tags"):
        llava_llada(tok, turns, [3])
    with pytest.raises(ValueError, match="2 <image> tags but 3 images"):
        llava_llada(tok, turns, [3, 3, 3])
    bad = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}]
    with pytest.raises(ValueError, match="assistant turn"):
        llava_llada(tok, bad, [3])


def test_think_tags_pass_through_as_text(tok):
    for tag in ("/think", "/no_think"):
        question = f"<image>\nHow many shapes are there? {tag}"
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "two"}]
        enc = llava_llada(tok, turns, [2])
        piece = tok.encode(f"\nHow many shapes are there? {tag}")
        s = enc.image_starts[0] + 2
        np.testing.assert_array_equal(enc.tokens[s : s + len(piece)], piece)
        assert not enc.targets[s : s + len(piece)].any()
        assert tag in tok.decode(enc.tokens)
        special = set(tok.structural_ids) | {tok.mask_id, tok.eos_id}
        assert not special & set(piece)


def test_plain_template(tok):
    turns = [
        {"from": "human", "value": "<image>\nGive a brief description."},
        {"from": "gpt", "value": "a red circle and a blue square"},
    ]
    enc = plain(tok, turns, [6])
    caption = tok.encode("a red circle and a blue square\n")
    tokens, targets = seq(([tok.placeholder_id] * 6, False), (caption, True))
    np.testing.assert_array_equal(enc.tokens, tokens)
    np.testing.assert_array_equal(enc.targets, targets)
    assert enc.image_starts == (0,)
    assert enc.cut_points == (len(tokens),)
    # No BOS, no headers: stage 1 is image + caption only.
    assert not set(tok.structural_ids) & set(enc.tokens.tolist())
    two = plain(tok, [{"from": "human", "value": "<image> <image>"}, turns[1]], [2, 3])
    assert two.image_starts == (0, 2)
    with pytest.raises(ValueError, match="plain template"):
        plain(tok, turns * 2, [6, 6])
    assert encode_conversation("plain", tok, turns, [6]).tokens.tolist() == enc.tokens.tolist()
    with pytest.raises(ValueError, match="unknown template"):
        encode_conversation("chatml", tok, turns, [6])


def test_encode_prompt(tok):
    tokens, starts = encode_prompt(tok, "What color is the shape?", [5])
    E, SH, EH, EOT = tok.encode, tok.start_header_id, tok.end_header_id, tok.eot_id
    expected, _ = seq(
        *system_part(tok),
        ([SH], 0), (E("user"), 0), ([EH], 0), (E("\n\n"), 0), ([tok.placeholder_id] * 5, 0),
        (E("\nWhat color is the shape?"), 0), ([EOT], 0),
        ([SH], 0), (E("assistant"), 0), ([EH], 0), (E("\n\n"), 0),
    )  # fmt: skip
    np.testing.assert_array_equal(tokens, expected)
    assert tokens.dtype == np.int32
    # The training sequence of the same exchange starts with exactly this prompt.
    turns = [
        {"from": "human", "value": "<image>\nWhat color is the shape?"},
        {"from": "gpt", "value": "red"},
    ]
    enc = llava_llada(tok, turns, [5])
    np.testing.assert_array_equal(enc.tokens[: len(tokens)], tokens)
    assert starts == enc.image_starts
    # Tags already in the question are kept; two images without tags get one "<image>\n" each.
    t2, s2 = encode_prompt(tok, "<image>\nWhat color is the shape?", [5])
    np.testing.assert_array_equal(t2, tokens)
    assert s2 == starts
    t3, s3 = encode_prompt(tok, "Same?", [2, 3], system="Be brief.")
    assert len(s3) == 2 and s3[1] == s3[0] + 2 + len(E("\n"))
    head = (
        "system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert tok.decode(t3[: s3[0]]).endswith(head)
    t4, s4 = encode_prompt(tok, "No image here.")
    assert s4 == () and tok.placeholder_id not in t4.tolist()


def test_move_image_tag_first():
    assert move_image_tag_first("What is it?\n<image>") == "<image>\nWhat is it?"
    assert move_image_tag_first("<image>What") == "<image>What"
    assert move_image_tag_first("a <image> b <image>") == "a <image> b <image>"
    assert move_image_tag_first("no tag") == "no tag"


# -- tokenizer ------------------------------------------------------------------------------------


def test_demo_tokenizer_rebuilds_to_the_shipped_file(tmp_path):
    """The shipped demo_tokenizer.json is what training it gives, byte for byte, in any process
    (another hash seed too); saving writes those bytes."""
    shipped = demo_tokenizer.SHIPPED.read_bytes()
    code = (
        "import hashlib; from lladav_jax.data.demo_tokenizer import train_demo_tokenizer;"
        "print(hashlib.sha256(train_demo_tokenizer().to_json().encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == hashlib.sha256(shipped).hexdigest(), (
        "the demo tokenizer changed: rebuild it with `python -m lladav_jax.data.demo_tokenizer`")
    tok = load_demo_tokenizer()
    assert tok.save(tmp_path / "a") and (tmp_path / "a" / "tokenizer.json").read_bytes() == shipped


def test_demo_tokenizer_specials_and_vocab():
    tok = load_demo_tokenizer()
    assert tok.vocab_size <= model_config("tiny").text.vocab_size
    ids = {
        "mask": tok.mask_id, "bos": tok.bos_id, "eos": tok.eos_id,
        "start_header": tok.start_header_id, "end_header": tok.end_header_id, "eot": tok.eot_id,
    }  # fmt: skip
    assert len(set(ids.values())) == 6
    assert dict(tok.special_ids) == ids and set(ids) == set(SPECIAL_TOKENS)
    for name, i in ids.items():
        assert tok.token_to_id(SPECIAL_TOKENS[name]) == i
        assert tok.decode([i]) == SPECIAL_TOKENS[name]
    assert tok.pad_id == tok.eos_id == tok.placeholder_id
    added = json.loads(tok.to_json())["added_tokens"]
    assert {t["content"] for t in added if t["special"]} == set(SPECIAL_TOKENS.values())


def test_demo_tokenizer_covers_the_synthetic_words():
    tok = load_demo_tokenizer()
    for answers in synthetic.ANSWERS.values():
        for answer in answers:
            assert len(tok.encode(answer)) == 1, answer  # an answer right after "\n\n"
            assert len(tok.encode("\n\n" + answer)) == 2, answer
    question = "\nWhere is the purple triangle?"
    assert len(tok.encode(question)) == len(question.split()) + 2  # "\n", words, "?"
    assert len(tok.encode("\n\n" + DEFAULT_SYSTEM_PROMPT)) < 45


def test_encode_decode_and_byte_fallback():
    tok = load_demo_tokenizer()
    for text in ["Grüße, 世界! 🙂\ttabs\r\n", "", "   ", "x" * 300, "<image>", "\x00\x7f"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # No BOS/EOS added; special-token text inside data stays text.
    ids = tok.encode("a <|eot_id|> b <|mdm_mask|>")
    assert not set(ids) & {tok.eot_id, tok.mask_id, tok.bos_id, tok.eos_id}
    assert tok.decode(ids) == "a <|eot_id|> b <|mdm_mask|>"
    assert tok.decode([tok.bos_id, *tok.encode("hi")], skip_special_tokens=True) == "hi"


def test_save_load_pickle_round_trip(tmp_path):
    tok = load_demo_tokenizer()
    path = tok.save(tmp_path / "model")
    for where in (tmp_path / "model", path):
        loaded = Tokenizer.load(where)
        assert loaded.to_json() == tok.to_json()
        assert loaded.encode("What color?") == tok.encode("What color?")
        assert loaded.mask_id == tok.mask_id
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("a <|eot_id|>") == tok.encode("a <|eot_id|>")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")


def test_missing_special_token_is_named(tmp_path):
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf.add_special_tokens([t for t in SPECIAL_TOKENS.values() if t != "<|mdm_mask|>"])
    (tmp_path / "tokenizer.json").write_text(hf.to_str())
    with pytest.raises(ValueError, match=r"lacks the special token '<\|mdm_mask\|>'"):
        Tokenizer.load(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        Tokenizer.load(tmp_path / "bad.json")


def test_official_like_ids_are_looked_up_not_hard_coded(tmp_path):
    """A tokenizer whose specials sit at the official ids (126080...) works unchanged."""
    official = {
        "<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
        "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348,
    }  # fmt: skip
    vocab = {"hello": 0, "[UNK]": 1, **official}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.add_special_tokens(list(official))
    tok = Tokenizer(hf.to_str())
    assert (tok.bos_id, tok.eos_id, tok.mask_id) == (126080, 126081, 126336)
    assert (tok.start_header_id, tok.end_header_id, tok.eot_id) == (126346, 126347, 126348)
    assert tok.vocab_size == 126349
    assert tok.encode("hello") == [0]
