"""The built-in synthetic data set: Pillow drawings of shapes with short questions and answers.

Every sample is a pure function of (seed, split, index): an image of 60-300 px per side (so the
AnyRes grids vary), one question of four types with a one-word answer, balanced over answers:

    color     "What color is the shape?"    -> red | green | blue | yellow | purple | orange
    shape     "What shape is this?"         -> circle | square | triangle
    count     "How many shapes are there?"  -> one | two | three | four
    position  "Where is the red circle?"    -> left | right | top | bottom

`train` and `test` draw from different random streams, so the held-out split never repeats a
training sample. `kind="caption"` gives the same images with captions (for the `plain` stage).
`kind="size"` asks a fifth question that the `qa` kind never asks, for fine-tuning a trained
demo on something new (configs/demo_lora.py):

    size        "Is the circle big?"               -> yes | no

`kind="describe"` asks for a long answer: 2-4 shapes, one per quadrant, named in reading order
(7, 11 or 15 tokens), for measuring the sampler where answers span several blocks:

    describe    "Describe the shapes."  -> "a red circle and a blue square and a green triangle"

Two kinds are not single images (data/synthetic_media.py): `motion`, a video of a shape moving
("Which way does the red circle move?" -> left | right | up | down), and `pick`, 2-4 images
("Which image shows the red circle?" -> first | second | third | fourth); `mixed` cycles
qa, motion, pick and motion samples by index, so one run sees one image, several images and
videos.

    source = SyntheticSource(1000, split="train")   # a Grain random-access data source
    write_llava_json("data/train.json", "data/images", 1000, split="train")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from lladav_jax.data.synthetic_draw import COLORS, SHAPES, pick, png_bytes, render, sample_rng
from lladav_jax.data.synthetic_media import (
    MEDIA_ANSWERS,
    MEDIA_KINDS,
    MEDIA_QUESTIONS,
    media_sample,
)

COUNTS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom")
SIZES = ("yes", "no")  # "is it big?": one token each in the demo tokenizer, like every answer
QUESTION_TYPES = ("color", "shape", "count", "position")  # the `qa` kind's
ANSWERS = {"color": tuple(COLORS), "shape": SHAPES, "count": COUNTS, "position": POSITIONS,
           "size": SIZES, **MEDIA_ANSWERS}
QUESTIONS = {
    "color": ("What color is the shape?", "Which color is the {shape}?"),
    "shape": ("What shape is this?", "What shape is the {color} object?"),
    "count": ("How many shapes are there?", "How many shapes can you see?"),
    "position": (
        "Where is the {color} {shape}?",
        "Is the {color} {shape} left, right, top or bottom?",
    ),
    "size": ("Is the {shape} big?", "Is this {shape} a big one?"),
    **MEDIA_QUESTIONS,
}
CAPTION_PROMPT = "Describe the image."
DESCRIBE_QUESTIONS = ("Describe the shapes.", "Name every shape from top left to bottom right.")
DESCRIBE_COUNTS = COUNTS[1:]  # shapes in a `describe` scene, cycling with the index
KINDS = ("qa", "caption", "size", "motion", "pick", "mixed", "describe")
# `mixed`: sample i is of kind MIXED[i % 4], the next sample of that kind (`mixed_part`);
# videos twice as often: the tiny demo model learns them slowest.
MIXED = ("qa", "motion", "pick", "motion")
MIN_SIDE, MAX_SIDE = 60, 300


def chance_accuracy(question_type: str) -> float:
    """Exact-match accuracy of guessing (answers are balanced, so also of the majority answer)."""
    return 1.0 / len(ANSWERS[question_type])


def _scene(rng: np.random.Generator, qtype: str, answer: str):
    """(width, height, background, shapes [(shape, color, cx, cy, r)]) for one question."""
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    m = min(w, h)
    if qtype == "count":
        # One shape per quadrant, so shapes never overlap.
        cells = rng.permutation(4)[: COUNTS.index(answer) + 1]
        cw, ch = w / 2, h / 2
        shapes = []
        for cell in sorted(int(c) for c in cells):
            r = rng.uniform(0.25, 0.35) * min(cw, ch)
            cx = (cell % 2) * cw + rng.uniform(r, cw - r)
            cy = (cell // 2) * ch + rng.uniform(r, ch - r)
            shapes.append((pick(rng, SHAPES), pick(rng, tuple(COLORS)), cx, cy, r))
        return w, h, background, shapes
    shape = answer if qtype == "shape" else pick(rng, SHAPES)
    color = answer if qtype == "color" else pick(rng, tuple(COLORS))
    if qtype == "position":
        # Centre of the named third, a little jitter along the other axis.
        r = rng.uniform(0.10, 0.14) * m
        along = {"left": (w / 6, h / 2), "right": (5 * w / 6, h / 2)}
        along |= {"top": (w / 2, h / 6), "bottom": (w / 2, 5 * h / 6)}
        cx, cy = along[answer]
        jitter = rng.uniform(-0.1, 0.1) * m
        cx, cy = (cx, cy + jitter) if answer in ("left", "right") else (cx + jitter, cy)
    else:
        # size: radii a factor of two apart at least, whatever the image's size.
        low, high = {"yes": (0.30, 0.40), "no": (0.08, 0.15)}.get(
            answer if qtype == "size" else "", (0.2, 0.3))
        r = rng.uniform(low, high) * m
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    return w, h, background, [(shape, color, cx, cy, r)]


def caption(shapes) -> str:
    return " and ".join(f"a {color} {shape}" for shape, color, *_ in shapes)


def _sample(index: int, split: str, seed: int, kind: str) -> tuple[dict[str, Any], tuple]:
    """(the sample's fields but its image, the scene to render: w, h, background, shapes)."""
    rng = sample_rng(seed, split, index)
    if kind == "describe":
        return _describe(index, split, seed, rng)
    # Question type and answer cycle with the index: every answer equally often.
    types = ("size",) if kind == "size" else QUESTION_TYPES
    n_types = len(types)
    qtype = types[index % n_types]
    answers = ANSWERS[qtype]
    answer = answers[(index // n_types) % len(answers)]
    scene = _scene(rng, qtype, answer)
    shape, color = scene[3][0][:2]
    question = pick(rng, QUESTIONS[qtype]).format(shape=shape, color=color)
    sample_id = f"synthetic-{split}-{seed}-{index:07d}"
    if kind == "caption":
        question, answer, qtype = CAPTION_PROMPT, caption(scene[3]), "caption"
    return _fields(sample_id, question, answer, qtype), scene


def _describe(index: int, split: str, seed: int, rng) -> tuple[dict[str, Any], tuple]:
    """A `describe` sample: a count scene (one shape per quadrant, in reading order) whose
    answer names every shape."""
    scene = _scene(rng, "count", DESCRIBE_COUNTS[index % len(DESCRIBE_COUNTS)])
    sample_id = f"synthetic-describe-{split}-{seed}-{index:07d}"
    question = pick(rng, DESCRIBE_QUESTIONS)
    return _fields(sample_id, question, caption(scene[3]), "describe"), scene


def _fields(sample_id: str, question: str, answer: str, qtype: str) -> dict[str, Any]:
    """A one-image sample's fields but its pixels."""
    return {
        "id": sample_id,
        "image": f"{sample_id}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "question_type": qtype,
        "answer": answer,
    }


def mixed_part(index: int) -> tuple[str, int]:
    """(kind, index within that kind) of the `mixed` kind's sample `index`."""
    cycles, at = divmod(index, len(MIXED))
    kind = MIXED[at]
    return kind, cycles * MIXED.count(kind) + MIXED[:at].count(kind)


def _parts(index: int, split: str, seed: int,
           kind: str) -> tuple[dict[str, Any], Callable[[], dict], dict]:
    """(the sample's fields but its media, a function drawing the media fields (`images` or
    `videos`), the header's stand-ins for them (`_image_sizes` or `_video_info`))."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    if kind == "mixed":
        part, sub = mixed_part(index)
        return _parts(sub, split, seed, part)
    if kind in MEDIA_KINDS:

        return media_sample(index, split, seed, kind)
    fields, scene = _sample(index, split, seed, kind)
    return (fields, lambda: {"images": [png_bytes(render(*scene))]},
            {"_image_sizes": [list(scene[:2])]})


def make_sample(
    index: int, split: str = "train", seed: int = 0, kind: str = "qa"
) -> dict[str, Any]:
    """One sample: a RawSample with PNG bytes in `images` (MP4 bytes in `videos`), plus
    `question_type` and `answer`."""
    fields, media, _ = _parts(index, split, seed, kind)
    return {**fields, **media()}


class SyntheticSource:
    """Random-access source (`len`, `[i]`) of `n` samples; usable as a Grain data source."""

    def __init__(self, n: int, split: str = "train", seed: int = 0, kind: str = "qa"):
        sample_rng(seed, split, 0)  # validates split
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n, self.split, self.seed, self.kind = int(n), split, int(seed), kind

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self!r}")
        return make_sample(index, self.split, self.seed, self.kind)

    def header(self, index: int) -> dict[str, Any]:
        """Sample `index` without its images: `_image_sizes` instead (the sizes are drawn, not
        decoded; a video's `_video_info`), all that measuring it takes (`Featurizer.measure`);
        the pipeline reads the full sample only where it adds the pixels. (Full samples carry
        no sizes: code that changes their images, as benchmarks/data.py does, cannot leave
        stale ones.)"""
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self!r}")
        fields, _, head = _parts(index, self.split, self.seed, self.kind)
        return {**fields, **head}

    def __repr__(self) -> str:
        args = f"n={self.n}, split={self.split!r}, seed={self.seed}, kind={self.kind!r}"
        return f"SyntheticSource({args})"


def write_llava_json(
    path: str | os.PathLike,
    image_folder: str | os.PathLike,
    n: int,
    split: str = "train",
    *,
    seed: int = 0,
    kind: str = "qa",
    video_folder: str | os.PathLike | None = None,
) -> str:
    """Writes the same samples as LLaVA JSON (or JSONL if `path` ends in .jsonl) + PNG and MP4
    files.

    Image names in the JSON are relative to `image_folder`, video names to `video_folder`
    (default: `image_folder`). Returns the JSON path.
    """
    path, image_folder = os.fspath(path), os.fspath(image_folder)
    video_folder = image_folder if video_folder is None else os.fspath(video_folder)
    rows = []
    source = SyntheticSource(n, split, seed, kind)
    for sample in (source[i] for i in range(len(source))):
        for field, folder in (("image", image_folder), ("video", video_folder)):
            names = sample.get(field, [])
            for name, data in zip([names] if isinstance(names, str) else names,
                                  sample.pop(f"{field}s", [])):
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
        rows.append(sample)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            f.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            json.dump(rows, f, indent=1)
    os.replace(tmp, path)
    return path


def corpus() -> list[str]:
    """Every text the data set produces, as the chat template splits it (for the demo BPE)."""
    texts = [f"\n{CAPTION_PROMPT}"]
    for qtype in (*QUESTION_TYPES, *MEDIA_KINDS):
        for pattern in QUESTIONS[qtype]:
            for shape in SHAPES:
                for color in COLORS:
                    texts.append("\n" + pattern.format(shape=shape, color=color))
        texts += [f"\n\n{answer}" for answer in ANSWERS[qtype]]
    # Captions: every "a {color} {shape}" phrase, first and later in a caption.
    for shape in SHAPES:
        for color in COLORS:
            phrase = f"a {color} {shape}"
            texts += [f"\n\n{phrase}", f"{phrase}\n", f"{phrase} and {phrase}"]
    return texts
