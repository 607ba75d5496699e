"""The synthetic data set's video (`motion`), multi-image (`pick`) and `mixed` kinds:
deterministic, balanced, the pictures say the answers, headers measure as the samples."""

import importlib.util
import io
import itertools
import json
import pathlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lladav_jax.data import synthetic_media
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.example import Example, Measured
from lladav_jax.data.featurize import Featurizer, video_frames
from lladav_jax.data.sources.llava_json import LlavaJsonSource
from lladav_jax.data.synthetic import (
    ANSWERS,
    COLORS,
    MIXED,
    QUESTION_TYPES,
    SyntheticSource,
    chance_accuracy,
    make_sample,
    mixed_part,
    write_llava_json,
)
from lladav_jax.data.video import probe, read_frames
from lladav_jax.models.variants import model_config
from lladav_jax.train.config_check import check_config

CONFIG = pathlib.Path(__file__).parents[2] / "configs" / "demo_video.py"
MEDIA = ("motion", "pick", "mixed")


def demo_video_config():
    spec = importlib.util.spec_from_file_location("demo_video", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def anyres_tiny():
    """The tiny model with AnyRes (several images: one padded tile each) and 8-frame videos."""
    cfg = model_config("tiny")
    cfg.image.max_tiles, cfg.video.max_frames = 37, 8
    cfg.image.max_visual_tokens = 1024
    return cfg


def shape_of(px: np.ndarray) -> tuple[str, str]:
    """(shape, color) of the one shape in an image, from its exact fill colour and how much of
    its bounding box it fills (square 1, circle pi / 4, triangle 1 / 2)."""
    for color, rgb in COLORS.items():
        mask = (px == rgb).all(-1)
        if mask.sum() > 20:
            ys, xs = np.nonzero(mask)
            fill = mask.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
            return ("square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"), color
    raise AssertionError("no shape drawn")


@pytest.mark.parametrize("kind", MEDIA)
def test_deterministic(kind):
    a, b = SyntheticSource(12, seed=3, kind=kind), SyntheticSource(12, seed=3, kind=kind)
    for i in (0, 4, 11):
        assert a[i] == b[i] and a.header(i) == b.header(i)
    assert make_sample(5, "test", 1, kind) != make_sample(5, "test", 2, kind)
    assert make_sample(5, "train", 1, kind) != make_sample(5, "test", 1, kind)


def test_answers_balanced_and_kinds_cycle():
    for kind in ("motion", "pick"):
        counts = Counter(SyntheticSource(40, kind=kind).header(i)["answer"] for i in range(40))
        assert set(counts) == set(ANSWERS[kind]) and set(counts.values()) == {10}
        assert chance_accuracy(kind) == pytest.approx(0.25)
    mixed = SyntheticSource(4 * 48, kind="mixed")
    types, ids = Counter(), set()
    for i in range(len(mixed)):
        h = mixed.header(i)
        sub, k = mixed_part(i)
        assert sub == MIXED[i % 4] and k == (i // 4) * MIXED.count(sub) + MIXED[: i % 4].count(sub)
        assert h == SyntheticSource(96, kind=sub).header(k)  # the kind's own sample
        assert (h["question_type"] in QUESTION_TYPES) == (sub == "qa")
        types[h["question_type"], h["answer"]] += 1
        ids.add(h["id"])
    assert len(ids) == len(mixed)  # no id twice (the file names come from the ids)
    for qtype in {q for q, _ in types}:  # every answer of a type equally often
        assert len({n for (q, _), n in types.items() if q == qtype}) == 1, qtype
    assert {q for q, _ in types} == {*QUESTION_TYPES, "motion", "pick"}


def test_motion_video_moves_the_way_the_answer_says():
    cfg = demo_video_config().model
    src = SyntheticSource(24, kind="motion")
    branches = set()
    for i in range(len(src)):
        s = src[i]
        assert s["conversations"][0]["value"].count("<image>") == 1
        info = probe(s["videos"][0])
        assert [info.frames, info.fps, info.width, info.height] == src.header(i)["_video_info"]
        assert info.width % 2 == 0 and info.height % 2 == 0
        chosen = video_frames(info, cfg)
        branches.add("linspace" if chosen[1] - chosen[0] != 2 else "every_second")
        assert len(chosen) <= cfg.video.max_frames
        frames = read_frames(s["videos"][0], chosen)
        centres = []
        for px in frames:
            px = px.astype(int)
            ys, xs = np.nonzero(np.abs(px - px[0, 0]).sum(-1) > 90)  # corners: background
            assert len(xs) > 30, "the shape is in every frame"
            centres.append((xs.mean() / info.width, ys.mean() / info.height))
        (x0, y0), (x1, y1) = centres[0], centres[-1]
        moved = {"right": x1 - x0, "left": x0 - x1, "down": y1 - y0, "up": y0 - y1}
        assert moved[s["answer"]] > 0.15, (i, s["answer"], centres)
        across = abs(y1 - y0) if s["answer"] in ("left", "right") else abs(x1 - x0)
        assert across < 0.05, (i, s["answer"], centres)
        along = [c[0] if s["answer"] in ("left", "right") else c[1] for c in centres]
        sign = 1 if s["answer"] in ("right", "down") else -1
        assert all(sign * (b - a) > 0 for a, b in itertools.pairwise(along))  # steadily
    assert branches == {"linspace", "every_second"}  # both frame choices under max_frames 8


def test_pick_answer_matches_the_image_with_the_asked_shape():
    src = SyntheticSource(24, kind="pick")
    for i in range(len(src)):
        s = src[i]
        n = len(s["images"])
        assert 2 <= n <= 4 and len(s["image"]) == n
        assert s["conversations"][0]["value"].startswith("<image>\n" * n)
        assert s["conversations"][0]["value"].count("<image>") == n
        drawn = [shape_of(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
                 for b in s["images"]]
        assert len(set(drawn)) == n  # every image a different pair
        place = ANSWERS["pick"].index(s["answer"])
        shape, color = drawn[place]
        assert s["conversations"][0]["value"].endswith(f" {color} {shape}?"), (i, drawn)


@pytest.mark.parametrize("kind", MEDIA)
@pytest.mark.parametrize("layout", ["demo_video", "anyres"])
def test_header_measures_as_the_full_sample(kind, layout):
    cfg = demo_video_config().model if layout == "demo_video" else anyres_tiny()
    feat = Featurizer(cfg, load_demo_tokenizer(), seq_len=512)
    src = SyntheticSource(9, kind=kind)
    for i in range(len(src)):
        full, head = src[i], src.header(i)
        media = {"images", "videos"}
        assert not media & set(head) and not {"_image_sizes", "_video_info"} & set(full)
        assert {k: v for k, v in full.items() if k not in media} == {
            k: v for k, v in head.items() if k not in ("_image_sizes", "_video_info")}
        m_head, m_full = feat.measure(head), feat.measure(full)
        assert isinstance(m_head, Measured) and isinstance(m_full, Measured)
        np.testing.assert_array_equal(m_head.tokens, m_full.tokens)
        np.testing.assert_array_equal(m_head.targets, m_full.targets)
        for field in ("image_starts", "image_sizes", "image_tokens", "image_tiles", "video"):
            assert getattr(m_head, field) == getattr(m_full, field), field
        ex = feat.add_pixels(m_head, full)
        assert isinstance(ex, Example), ex
        assert [im.layout.num_tokens for im in ex.images] == list(m_head.image_tokens)


def test_demo_video_config_fits_every_sample():
    config = demo_video_config()
    check_config(config)
    feat = Featurizer(config.model, load_demo_tokenizer(), seq_len=config.data.seq_len,
                      system=config.data.system_prompt)
    src = SyntheticSource(3 * 40, split="test", kind=config.data.synthetic_kind)
    for i in range(len(src)):
        assert isinstance(feat.measure(src.header(i)), Measured), i


@pytest.mark.parametrize("name", ["mixed.json", "mixed.jsonl"])
def test_write_llava_json_round_trip(tmp_path, name):
    images, videos = tmp_path / "images", tmp_path / "videos"
    path = write_llava_json(tmp_path / name, images, 9, split="test", kind="mixed",
                            video_folder=videos)
    text = pathlib.Path(path).read_text()
    rows = json.loads(text) if name.endswith(".json") else [json.loads(x)
                                                            for x in text.splitlines()]
    assert len(rows) == 9
    assert sorted(p.name for p in videos.iterdir()) == sorted(
        r["video"] for r in rows if "video" in r)
    feat = Featurizer(anyres_tiny(), load_demo_tokenizer(), seq_len=512)
    source, mem = LlavaJsonSource(path, images, videos), SyntheticSource(9, "test", kind="mixed")
    for i, row in enumerate(rows):
        assert not {"images", "videos", "_image_sizes", "_video_info"} & set(row)
        assert row["conversations"] == mem[i]["conversations"]
        from_disk, in_memory = feat(source[i]), feat(mem[i])
        assert isinstance(from_disk, Example), from_disk
        np.testing.assert_array_equal(from_disk.tokens, in_memory.tokens)
        for a, b in zip(from_disk.images, in_memory.images, strict=True):
            np.testing.assert_array_equal(a.tiles, b.tiles)


def test_motion_goes_from_the_centre_to_the_named_edge_without_leaving_the_frame():
    rng = np.random.default_rng(0)
    for answer in ANSWERS["motion"] * 5:
        scenes = synthetic_media.motion_scenes(rng, answer)
        w, h = scenes[0][:2]
        first, last = scenes[0][3][0], scenes[-1][3][0]
        for _, _, cx, cy, r in (first, last):
            assert r <= cx <= w - r and r <= cy <= h - r
        axis, side = (2, w) if answer in ("left", "right") else (3, h)
        assert abs(first[axis] - side / 2) <= 0.05 * side  # starts about the centre
        toward_end = last[axis] > side / 2 if answer in ("right", "down") else last[axis] < side / 2
        assert toward_end and abs(last[axis] - first[axis]) >= side / 5
