"""Image preprocessing as in LLaDA-V (LLaVA-NeXT `process_anyres_image` + SigLIP processor).

Host side, numpy + Pillow only. Sizes are (width, height) as in PIL; grids are (cols, rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lladav_jax.data.layout import (
    VisualLayout,
    anyres_layout,
    best_grid,
    grid_pinpoints,
    plain_layout,
    select_best_resolution,
)

# grid_pinpoints / select_best_resolution live in layout (token counts need no pixels).
__all__ = [
    "ProcessedImage",
    "grid_pinpoints",
    "normalize",
    "process_image",
    "select_best_resolution",
]


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """tiles float32 [n, S, S, 3] (tile 0 = base); grid (cols, rows), (0, 0) for plain."""

    tiles: np.ndarray
    layout: VisualLayout
    size: tuple[int, int]
    grid: tuple[int, int]


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 (x/255 - 0.5)/0.5, in the same float steps as transformers."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)


def _resize_and_pad(image: Image.Image, target_wh: tuple[int, int]) -> Image.Image:
    """Aspect-preserving resize (sides ceil'd), pasted centred on a black canvas."""
    width, height = image.size
    tw, th = target_wh
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        new_w, new_h = tw, min(math.ceil(height * scale_w), th)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h)), ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


def process_image(image: Image.Image, cfg) -> ProcessedImage:
    """Tiles and visual layout of one image for cfg.image.aspect_ratio ('anyres_max_N'|'plain')."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    s = cfg.vision.image_size
    # Pillow's default filter (bicubic) for the base tile, as `image.resize((S, S))` in LLaVA.
    base = np.asarray(image.resize((s, s)))[None]
    if cfg.image.aspect_ratio == "plain":
        return ProcessedImage(normalize(base), plain_layout(cfg), image.size, (0, 0))
    if not str(cfg.image.aspect_ratio).startswith("anyres_max"):
        raise ValueError(f"unsupported image.aspect_ratio {cfg.image.aspect_ratio!r}")
    cols, rows = best_grid(image.size, cfg)
    canvas = np.asarray(_resize_and_pad(image, (cols * s, rows * s)))
    # Cut row by row (LLaVA's divide_to_patches order).
    grid = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(-1, s, s, 3)
    tiles = normalize(np.concatenate([base, grid]))
    layout = anyres_layout(image.size, (cols, rows), cfg)
    return ProcessedImage(tiles, layout, image.size, (cols, rows))
