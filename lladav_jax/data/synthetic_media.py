"""The synthetic data set's video and multi-image kinds (`data/synthetic.py` has the others).

Drawn with the same shapes, colours and `render` as the single images; pure functions of
(seed, split, index, kind), every answer equally often (it cycles with the index):

    motion  an MP4 of one shape moving from the centre towards an edge
            "Which way does the red circle move?"  -> left | right | up | down
    pick    2-4 images of one shape each, every image a different colour-shape pair
            "Which image shows the red circle?"    -> first | second | third | fourth

A motion video is 64-96 px a side (even sides, for the codec's yuv420p), 6-14 s at 2 frames a
second: about a frame a second (`video.fps` 1) chooses 6-14 of its 12-28 frames, so under
`video.max_frames` 8 the videos over 8 s take the evenly spread (linspace) branch and the
others every second frame. The shape is whole in every frame and moves from about the centre
to near the edge the answer names (a fifth of the frame or more), keeping to about the middle
of the other axis. Where the shape spends its frames shows the way it goes, so a model can
answer without reading the frames' order: its last frames sit on the two quadrants of the
edge the answer names (right: top-right and bottom-right), which the video layout's 2x2
pooled tokens tell apart. Anywhere on the other axis, they would not: a shape ending in the
top-right quadrant may have gone right along the top or up along the right.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

from lladav_jax.data.synthetic_draw import COLORS, SHAPES, pick, png_bytes, render, sample_rng
from lladav_jax.data.template import IMAGE_TAG
from lladav_jax.data.video import write_video

MEDIA_KINDS = ("motion", "pick")
MEDIA_ANSWERS = {
    "motion": ("left", "right", "up", "down"),  # which way the shape moves in a video
    "pick": ("first", "second", "third", "fourth"),  # which of 2-4 images
}
MEDIA_QUESTIONS = {
    "motion": ("Which way does the {color} {shape} move?", "Where does the {shape} go?"),
    "pick": ("Which image shows the {color} {shape}?", "In which image is the {color} {shape}?"),
}
VIDEO_FPS = 2
MIN_SECONDS, MAX_SECONDS = 6, 14
VIDEO_MIN_SIDE, VIDEO_MAX_SIDE = 64, 96
PICK_MIN_SIDE, PICK_MAX_SIDE = 60, 120
# The kinds' own random streams (`_rng`'s `stream`): a motion and a pick sample of one index,
# side by side in the `mixed` kind, share no draws with each other or with the image kinds.
STREAMS = {"motion": 1, "pick": 2}

Scene = tuple  # (width, height, background, [(shape, color, cx, cy, r)]), as `render` takes


def _background(rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(v) for v in rng.integers(225, 256, size=3))


def motion_scenes(rng: np.random.Generator, answer: str) -> list[Scene]:
    """The frames of a motion video (one scene each): a shape moving the way `answer` says."""
    w, h = (2 * int(v) for v in rng.integers(VIDEO_MIN_SIDE // 2, VIDEO_MAX_SIDE // 2 + 1,
                                             size=2))
    background = _background(rng)
    frames = VIDEO_FPS * int(rng.integers(MIN_SECONDS, MAX_SECONDS + 1))
    shape, color = pick(rng, SHAPES), pick(rng, tuple(COLORS))
    r = rng.uniform(0.14, 0.18) * min(w, h)
    along, across = (w, h) if answer in ("left", "right") else (h, w)
    # From about the centre to near the edge the answer names: the frames show where it goes.
    start = along / 2 + rng.uniform(-0.05, 0.05) * along
    end = along - r - rng.uniform(0, 0.05) * along
    if answer in ("left", "up"):
        start, end = along - start, along - end
    side = across / 2 + rng.uniform(-0.08, 0.08) * across  # about the middle: see above
    scenes = []
    for k in range(frames):
        a = start + (end - start) * k / (frames - 1)
        cx, cy = (a, side) if answer in ("left", "right") else (side, a)
        scenes.append((w, h, background, [(shape, color, cx, cy, r)]))
    return scenes


def video_bytes(scenes: list[Scene]) -> bytes:
    """The scenes drawn and encoded as an MP4 at `VIDEO_FPS`."""
    buf = io.BytesIO()
    write_video(buf, [np.asarray(render(*scene)) for scene in scenes], VIDEO_FPS)
    return buf.getvalue()


def pick_scenes(rng: np.random.Generator, answer: str) -> list[Scene]:
    """2-4 images of one shape each, the first scene's pair at the place `answer` names."""
    place = MEDIA_ANSWERS["pick"].index(answer)
    n = int(rng.integers(max(2, place + 1), len(MEDIA_ANSWERS["pick"]) + 1))
    pairs = [(shape, color) for shape in SHAPES for color in COLORS]
    chosen = [pairs[int(k)] for k in rng.choice(len(pairs), size=n, replace=False)]
    chosen.insert(place, chosen.pop(0))  # the asked pair, at its place
    scenes = []
    for shape, color in chosen:
        w, h = (int(v) for v in rng.integers(PICK_MIN_SIDE, PICK_MAX_SIDE + 1, size=2))
        r = rng.uniform(0.25, 0.35) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        scenes.append((w, h, _background(rng), [(shape, color, cx, cy, r)]))
    return scenes


def media_sample(index: int, split: str, seed: int,
                 kind: str) -> tuple[dict[str, Any], Callable[[], dict], dict]:
    """(the sample's fields but its media, a function drawing the media fields, the header's
    stand-ins for them) of a `motion` or `pick` sample (`synthetic._parts`)."""
    answers = MEDIA_ANSWERS[kind]
    answer = answers[index % len(answers)]
    rng = sample_rng(seed, split, index, STREAMS[kind])
    sample_id = f"synthetic-{kind}-{split}-{seed}-{index:07d}"
    if kind == "motion":
        scenes = motion_scenes(rng, answer)
        asked = scenes[0][3][0]
        w, h = scenes[0][:2]
        fields = {"id": sample_id, "video": f"{sample_id}.mp4"}
        media = lambda: {"videos": [video_bytes(scenes)]}
        head = {"_video_info": [len(scenes), float(VIDEO_FPS), w, h]}
        tags = 1
    else:
        scenes = pick_scenes(rng, answer)
        asked = scenes[answers.index(answer)][3][0]
        fields = {"id": sample_id, "image": [f"{sample_id}-{k}.png" for k in range(len(scenes))]}
        media = lambda: {"images": [png_bytes(render(*scene)) for scene in scenes]}
        head = {"_image_sizes": [list(scene[:2]) for scene in scenes]}
        tags = len(scenes)
    question = pick(rng, MEDIA_QUESTIONS[kind]).format(shape=asked[0], color=asked[1])
    fields |= {
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TAG}\n" * tags + question},
            {"from": "gpt", "value": answer},
        ],
        "question_type": kind,
        "answer": answer,
    }
    return fields, media, head
