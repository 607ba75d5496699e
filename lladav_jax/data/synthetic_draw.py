"""The synthetic data set's drawing: colours, shapes, seeded random streams, PNG bytes.

Shared by the image kinds (`data/synthetic.py`) and the video and multi-image kinds
(`data/synthetic_media.py`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
SPLITS = {"train": 0, "test": 1}  # part of the random key: the splits never share a stream


def sample_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The random stream of one sample; `stream` > 0: a kind's own (synthetic_media.py)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index] + ([stream] if stream else []))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, r: float):
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def render(w: int, h: int, background, shapes) -> Image.Image:
    image = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(image)
    for shape, color, cx, cy, r in shapes:
        _draw_shape(draw, shape, color, cx, cy, r)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Level 1: half the CPU of the default level 6 to encode (0.4 vs 0.7 ms a demo image) and
    # a little less to decode, for files 1.7x as large (~1.2 kB); the pixels are the same.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
