"""Seconds per answer of the LLaDA-V sampler: PyTorch reference vs ours, with and without caches.

    python benchmarks/sampler.py                       # small config, 2-core CPU: ~15 minutes
    python benchmarks/sampler.py --variant tiny --steps 32 --gen_length 64   # a quick look
    python benchmarks/sampler.py --torch_steps 16 --repeats 1   # the reference at 16 steps, scaled

One 384x384 image (1485 visual tokens) + a question; a 256-token answer in blocks of 32.
(a) the plain PyTorch reference (lladav_jax/checkpoints/torch_reference.py over transformers'
modules, the whole sequence every step, as the official sampler); (b) ours, no cache; (c)
prefix cache; (d) dual cache; (e) dual cache + threshold 0.9. Random weights, so the <|eot_id|>
stop is switched off (every run decodes every position) and, for (e), the head is sharpened so
that confidences pass the threshold as a trained model's do (a random model's never would).
Same weights everywhere; float32; compile time is reported apart from the timed run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np
import torch
import transformers
from flax import nnx
from PIL import Image

from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.image import process_image
from lladav_jax.data.layout import collate_visual
from lladav_jax.data.template import encode_prompt
from lladav_jax.diffusion import sampler
from lladav_jax.models import hf_params, lladav, variants


def build(variant: str, sharpen: float):
    cfg = variants.model_config(variant)
    hf = ref.randomize(
        transformers.LlavaOnevisionForConditionalGeneration(ref.onevision_config(cfg)),
        scale=0.02)
    with torch.no_grad():
        hf.lm_head.weight.mul_(sharpen)
    model = lladav.LLaDAV(cfg, rngs=nnx.Rngs(0))
    hf_params.load_hf(model, ref.official_from_onevision(hf, cfg),
                      hf_params.lladav_entries(cfg), cfg)
    return cfg, hf, model


def prompt_inputs(cfg, tok, size: int):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8))
    img = process_image(image, cfg)
    tokens, starts = encode_prompt(tok, "What is in the image?", [img.layout.num_tokens])
    tokens = np.asarray(tokens, np.int32)[None]
    visual = collate_visual([[(img, starts[0])]], cfg, tokens.shape[1])
    return img, tokens, starts, visual


def time_ours(model, prompt, options, ids, repeats: int) -> tuple[float, float, int]:
    run = sampler.compiled_generate(model, options, ids)
    start = time.perf_counter()
    out = jax.block_until_ready(run(prompt, jax.random.key(0)))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(run(prompt, jax.random.key(0)))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), first - float(np.median(times)), int(out["steps"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="small")
    ap.add_argument("--image_size", type=int, default=384)
    ap.add_argument("--gen_length", type=int, default=256)
    ap.add_argument("--block_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--sharpen", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip_torch", action="store_true")
    ap.add_argument("--torch_steps", type=int, default=0,
                    help="time the reference at this many steps (a multiple of the block count) "
                         "and scale to --steps: every uncached step is the same full-sequence "
                         "forward, so its time is linear in steps (default: --steps)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    tok = load_demo_tokenizer()
    cfg, hf, model = build(args.variant, args.sharpen)
    img, tokens, starts, visual = prompt_inputs(cfg, tok, args.image_size)
    ids = dataclasses.replace(sampler.SpecialIds.from_tokenizer(tok), eot=-1)  # no early stop
    base = sampler.SamplerOptions(gen_length=args.gen_length, steps=args.steps,
                                  block_length=args.block_length)
    prompt = dict(tokens=tokens, valid=np.ones_like(tokens, bool), **visual)
    print(f"{args.variant}: prompt {tokens.shape[1]} tokens ({img.layout.num_tokens} visual), "
          f"answer {args.gen_length} in blocks of {args.block_length}, {args.steps} steps; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    rows = {}
    if not args.skip_torch:
        s = img.tiles.shape
        pixels = torch.from_numpy(img.tiles.transpose(0, 3, 1, 2).copy()).reshape(1, *s[:1],
                                                                                   3, *s[1:3])
        is_image = np.zeros(tokens.shape, bool)
        is_image[0, starts[0] : starts[0] + img.layout.num_tokens] = True
        images = (pixels, torch.tensor([[img.size[1], img.size[0]]]), is_image)
        torch_steps = args.torch_steps or args.steps
        start = time.perf_counter()
        ref.generate(hf, tokens, np.ones_like(tokens, bool), mask_id=ids.mask,
                                 eot_id=-1, forbidden=ids.forbidden, images=images,
                                 gen_length=args.gen_length, steps=torch_steps,
                                 block_length=args.block_length)
        seconds = (time.perf_counter() - start) * args.steps / torch_steps
        if torch_steps != args.steps:
            print(f"(a) timed at {torch_steps} steps: {seconds * torch_steps / args.steps:.1f} "
                  f"s, scaled to {args.steps} steps", flush=True)
        rows["a PyTorch reference"] = (seconds, 0.0, args.steps)
    runs = {
        "b ours, no cache": base,
        "c ours, prefix cache": dataclasses.replace(base, cache="prefix"),
        "d ours, dual cache": dataclasses.replace(base, cache="dual"),
        "e ours, dual + threshold": dataclasses.replace(base, cache="dual",
                                                        threshold=args.threshold),
    }
    for name, options in runs.items():
        rows[name] = time_ours(model, prompt, options, ids, args.repeats)
        print(f"{name}: {rows[name][0]:.2f} s/answer, {rows[name][2]} steps", flush=True)
    b = rows["b ours, no cache"][0]
    print(f"{'run':28s} {'s/answer':>9s} {'compile s':>9s} {'steps':>6s} {'vs (a)':>7s} "
          f"{'vs (b)':>7s}")
    for name, (sec, compile_s, steps) in rows.items():
        vs_a = rows["a PyTorch reference"][0] / sec if "a PyTorch reference" in rows else None
        print(f"{name:28s} {sec:9.2f} {compile_s:9.1f} {steps:6d} "
              f"{(f'{vs_a:.1f}x' if vs_a else '-'):>7s} {b / sec:6.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: dict(seconds=v[0], compile=v[1], steps=v[2]) for k, v in rows.items()},
                      f, indent=2)


if __name__ == "__main__":
    main()
