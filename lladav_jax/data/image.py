"""Image preprocessing as in LLaDA-V (LLaVA-NeXT `process_anyres_image` + SigLIP processor).

A sample's only image gets AnyRes (or the stage-1 plain tile); each image of a sample with
several is padded to a square and made one tile (`pad`); a video's frames are one plain tile
each (`process_frames`). Host side, numpy + Pillow only. Sizes are (width, height) as in PIL;
grids are (cols, rows).
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
    image_mode,
    pad_layout,
    plain_layout,
    select_best_resolution,
    video_layout,
)

# grid_pinpoints / select_best_resolution live in layout (token counts need no pixels).
__all__ = [
    "ProcessedImage",
    "grid_pinpoints",
    "normalize",
    "process_frames",
    "process_image",
    "process_images",
    "select_best_resolution",
]


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """tiles float32 [n, S, S, 3] (tile 0 = base); grid (cols, rows), (0, 0) for a single
    tile. A video's frames are one ProcessedImage too: a tile per frame, `size` a frame's."""

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


def _expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """The official `expand2square`: the image pasted at the middle of the long side on a
    square of `background`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# `pad` background: the official `int(x * 255) for x in image_mean`, SigLIP's mean 0.5 -> 127.
PAD_BACKGROUND = (int(0.5 * 255),) * 3


def process_image(image: Image.Image, cfg, mode: str | None = None) -> ProcessedImage:
    """Tiles and visual layout of one image. `mode` (`layout.image_mode`): plain | anyres |
    pad; default: a sample's only image under cfg.image.aspect_ratio."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    mode = mode or image_mode(1, cfg)
    s = cfg.vision.image_size
    if mode == "pad":
        size = image.size
        square = np.asarray(_expand_to_square(image, PAD_BACKGROUND).resize((s, s)))[None]
        return ProcessedImage(normalize(square), pad_layout(cfg), size, (0, 0))
    # Pillow's default filter (bicubic) for the base tile, as `image.resize((S, S))` in LLaVA.
    base = np.asarray(image.resize((s, s)))[None]
    if mode == "plain":
        return ProcessedImage(normalize(base), plain_layout(cfg), image.size, (0, 0))
    cols, rows = best_grid(image.size, cfg)
    canvas = np.asarray(_resize_and_pad(image, (cols * s, rows * s)))
    # Cut row by row (LLaVA's divide_to_patches order).
    grid = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(-1, s, s, 3)
    tiles = normalize(np.concatenate([base, grid]))
    layout = anyres_layout(image.size, (cols, rows), cfg)
    return ProcessedImage(tiles, layout, image.size, (cols, rows))


def process_images(images: list[Image.Image], cfg) -> list[ProcessedImage]:
    """The images of one sample, in order: AnyRes for one, `pad` for each of several."""
    mode = image_mode(len(images), cfg)
    return [process_image(image, cfg, mode) for image in images]


def process_frames(frames: list[np.ndarray], cfg) -> ProcessedImage:
    """A video's chosen frames (uint8 RGB [H, W, 3]) -> one tile each, resized to S x S with
    Pillow's bicubic (the SigLIP processor's), and the pooled `video_layout`."""
    s = cfg.vision.image_size
    tiles = np.stack([np.asarray(Image.fromarray(f).convert("RGB").resize((s, s)))
                      for f in frames])
    height, width = frames[0].shape[:2]
    return ProcessedImage(normalize(tiles), video_layout(len(frames), cfg), (width, height),
                          (0, 0))
