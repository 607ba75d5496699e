"""The built-in synthetic data set: deterministic, disjoint splits, decodable, learnable answers."""

import hashlib
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lladav_jax.data import synthetic
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.example import Example
from lladav_jax.data.featurize import Featurizer
from lladav_jax.data.layout import best_grid
from lladav_jax.data.synthetic import (
    ANSWERS,
    COLORS,
    QUESTION_TYPES,
    SyntheticSource,
    chance_accuracy,
    make_sample,
    write_llava_json,
)
from lladav_jax.models.variants import model_config


def decode(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["images"][0])).convert("RGB"))


def fingerprint(sample) -> str:
    text = json.dumps(sample["conversations"])
    return hashlib.sha256(sample["images"][0] + text.encode()).hexdigest()


def test_deterministic():
    a, b = SyntheticSource(20, seed=3), SyntheticSource(20, seed=3)
    for i in (0, 7, 19):
        assert a[i] == b[i]
    assert make_sample(5, "test", 1) == make_sample(5, "test", 1)
    assert make_sample(5, "train", 1) != make_sample(5, "train", 2)


def test_splits_disjoint():
    train = {fingerprint(s) for s in map(SyntheticSource(200, "train").__getitem__, range(200))}
    test = {fingerprint(s) for s in map(SyntheticSource(200, "test").__getitem__, range(200))}
    assert len(train) == 200 and len(test) == 200
    assert not train & test
    assert SyntheticSource(1, "train")[0]["id"] != SyntheticSource(1, "test")[0]["id"]
    with pytest.raises(ValueError, match="split"):
        SyntheticSource(3, "valid")


def test_images_decode_with_varied_sizes_and_grids():
    cfg = model_config("tiny")
    src = SyntheticSource(64)
    sizes = []
    for i in range(len(src)):
        s = src[i]
        image = Image.open(io.BytesIO(s["images"][0]))
        image.load()
        assert image.format == "PNG" and image.mode == "RGB"
        w, h = image.size
        assert synthetic.MIN_SIDE <= w <= synthetic.MAX_SIDE
        assert synthetic.MIN_SIDE <= h <= synthetic.MAX_SIDE
        sizes.append((w, h))
        assert s["image"] == f"{s['id']}.png"
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.6 and max(ratios) > 1.6
    assert len({best_grid(size, cfg) for size in sizes}) >= 8


def test_answers_balanced_and_short():
    n = 4 * 12 * 5  # every type, every answer, several times
    src = SyntheticSource(n)
    by_type = {q: Counter() for q in QUESTION_TYPES}
    for i in range(n):
        s = src[i]
        assert s["conversations"][1]["value"] == s["answer"]
        assert len(s["answer"].split()) <= 2
        assert s["conversations"][0]["value"].startswith("<image>\n")
        by_type[s["question_type"]][s["answer"]] += 1
    for qtype, counts in by_type.items():
        assert set(counts) == set(ANSWERS[qtype])
        assert len(set(counts.values())) == 1, (qtype, counts)  # exactly balanced
        assert chance_accuracy(qtype) == pytest.approx(1 / len(ANSWERS[qtype]))
    assert chance_accuracy("color") == pytest.approx(1 / 6)


def test_answers_match_the_pictures():
    src = SyntheticSource(200)
    for i in range(len(src)):
        s = src[i]
        px = decode(s).astype(int)
        h, w, _ = px.shape
        if s["question_type"] == "color":
            rgb = np.array(COLORS[s["answer"]])
            assert (np.abs(px - rgb).sum(-1) == 0).sum() > 20
        if s["question_type"] == "position":
            background = px[0, 0]  # a corner is never covered
            ys, xs = np.nonzero(np.abs(px - background).sum(-1) > 60)
            cx, cy = xs.mean() / w, ys.mean() / h
            where = {"left": cx < 1 / 3, "right": cx > 2 / 3, "top": cy < 1 / 3}
            assert where.get(s["answer"], cy > 2 / 3), (i, s["answer"], cx, cy)


def test_source_protocol():
    src = SyntheticSource(5, kind="caption")
    assert len(src) == 5
    with pytest.raises(IndexError):
        src[5]
    s = src[0]
    assert s["question_type"] == "caption" and s["answer"].startswith("a ")
    assert "SyntheticSource(n=5" in repr(src)
    import grain

    ds = grain.MapDataset.source(SyntheticSource(6)).map(lambda s: s["id"])
    assert list(ds) == [SyntheticSource(6)[i]["id"] for i in range(6)]


def test_header_measures_as_the_full_sample():
    """`header` (no image drawn) measures exactly as the sample itself and as its PNG's own
    header; the pixels then match the measure."""
    tok = load_demo_tokenizer()
    feat = Featurizer(model_config("tiny"), tok, seq_len=512)
    src = SyntheticSource(8)
    for i in range(8):
        full, head = src[i], src.header(i)
        assert "images" not in head and "_image_sizes" not in full
        assert head == {**{k: v for k, v in full.items() if k != "images"},
                        "_image_sizes": head["_image_sizes"]}
        measures = [feat.measure(r) for r in (head, full)]
        for m in measures[1:]:
            assert m.image_sizes == measures[0].image_sizes
            np.testing.assert_array_equal(m.tokens, measures[0].tokens)
        ex = feat.add_pixels(measures[0], full)
        assert isinstance(ex, Example) and ex.images[0].size == measures[0].image_sizes[0]


def test_featurizes_with_both_templates():
    tok = load_demo_tokenizer()
    cfg = model_config("tiny")
    qa = Featurizer(cfg, tok, seq_len=512)
    for i in range(12):
        ex = qa(SyntheticSource(12)[i])
        assert isinstance(ex, Example) and len(ex) < 256
    cap = Featurizer(cfg, tok, template="plain", seq_len=512)
    ex = cap(SyntheticSource(3, kind="caption")[2])
    assert isinstance(ex, Example) and ex.image_starts == (0,)


@pytest.mark.parametrize("name", ["train.json", "train.jsonl"])
def test_write_llava_json(tmp_path, name):
    path = write_llava_json(tmp_path / name, tmp_path / "images", 6, split="test")
    with open(path) as f:
        text = f.read()
    rows = (
        json.loads(text)
        if name.endswith(".json")
        else [json.loads(x) for x in text.split("\n") if x]
    )
    src = SyntheticSource(6, "test")
    tok = load_demo_tokenizer()
    feat = Featurizer(model_config("tiny"), tok, seq_len=512)
    assert len(rows) == 6
    for i, row in enumerate(rows):
        mem = src[i]
        assert row["conversations"] == mem["conversations"] and row["id"] == mem["id"]
        assert "images" not in row and "_image_sizes" not in row
        assert (tmp_path / "images" / row["image"]).read_bytes() == mem["images"][0]
        from_disk = feat({**row, "images": [str(tmp_path / "images" / row["image"])]})
        np.testing.assert_array_equal(from_disk.tokens, feat(mem).tokens)


def test_describe_names_every_shape_in_reading_order():
    """`describe`: 2, 3, 4 shapes in turn, one per quadrant; the answer names them in reading
    order, and the k-th named color is drawn in the k-th occupied quadrant."""
    src = SyntheticSource(12, split="test", kind="describe")
    tok = load_demo_tokenizer()
    for i in range(len(src)):
        s = src[i]
        parts = s["answer"].split(" and ")
        assert len(parts) == i % 3 + 2 and s["question_type"] == "describe"
        assert len(tok.encode(s["answer"])) == 4 * len(parts) - 1  # 7, 11, 15 tokens
        px = decode(s).astype(int)
        h, w, _ = px.shape
        drawn = []  # the colors present in each quadrant, reading order
        for cy, cx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            cell = px[cy * h // 2:(cy + 1) * h // 2, cx * w // 2:(cx + 1) * w // 2]
            here = [c for c, rgb in COLORS.items()
                    if (np.abs(cell - np.array(rgb)).sum(-1) == 0).sum() > 10]
            assert len(here) <= 1
            drawn += here
        assert drawn == [p.split()[1] for p in parts], (i, s["answer"])
        assert all(p.split()[2] in synthetic.SHAPES for p in parts)
    assert src.header(3) == {k: v for k, v in src[3].items() if k != "images"} | {
        "_image_sizes": [list(decode(src[3]).shape[1::-1])]}
