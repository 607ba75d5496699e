"""The main job until training lands: an untrained forward pass of the `tiny` model.

    python -m lladav_jax.demo

Draws a picture with Pillow, lays it out with AnyRes, merges its visual tokens into a prompt,
runs LLaDA-V once and prints what happened. The weights are random: this checks the pipeline
end to end; it does not answer questions (training the `demo` config comes with the training
work).
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image, ImageDraw

from lladav_jax.data.image import process_image
from lladav_jax.data.layout import collate_visual
from lladav_jax.models import lladav, variants


def picture(width: int = 200, height: int = 120) -> Image.Image:
    image = Image.new("RGB", (width, height), (240, 240, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, 90, 90), fill=(200, 30, 30))
    draw.rectangle((120, 30, 180, 100), fill=(30, 60, 200))
    return image


def main() -> None:
    cfg = variants.model_config("tiny")
    image = process_image(picture(), cfg)
    v, prompt = image.layout.num_tokens, 8
    seq_len = prompt + v + 8
    tokens = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (1, seq_len))
    batch = dict(tokens=tokens, **collate_visual([[(image, prompt)]], cfg, seq_len))
    model = lladav.create(cfg)
    start = time.perf_counter()
    logits = np.asarray(model(**batch))
    took = time.perf_counter() - start
    cols, rows = image.grid
    print(f"image {image.size[0]}x{image.size[1]} -> base tile + {cols}x{rows} grid tiles "
          f"-> {v} visual tokens")
    print(f"sequence of {seq_len} tokens -> logits {logits.shape} in {took:.1f} s "
          f"(finite: {bool(np.isfinite(logits).all())})")
    for name in variants.VARIANTS:
        counts = lladav.param_counts(variants.model_config(name))
        print(f"{name}: " + ", ".join(f"{k} {n:,}" for k, n in counts.items()))
    print("weights are random: training the demo model arrives with the training work")


if __name__ == "__main__":
    main()
