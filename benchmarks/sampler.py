"""Seconds per answer of the LLaDA-V sampler: PyTorch reference vs ours, with and without caches.

    python benchmarks/sampler.py                    # small config, 2-core CPU: ~20 minutes
    python benchmarks/sampler.py --variant tiny --steps 32 --gen_length 64 --ratio_steps 0
    python benchmarks/sampler.py --legs a,b --repeats 5   # the reference against ours alone

One 384x384 image (1485 visual tokens) + a question; a 256-token answer in blocks of 32.
(a) the plain PyTorch reference (lladav_jax/checkpoints/torch_reference.py over transformers'
modules, the whole sequence every step, as the official sampler; torch's fused attention, as the
official model's default); (b) ours, no cache; (c)
prefix cache; (d) dual cache; (e) dual cache + threshold 0.9; (f) adaptive refresh + threshold
0.9. Random weights, so the <|eot_id|> stop is switched off (every run decodes every position)
and the head is sharpened so that confidences pass the threshold as a trained model's do (a
random model's never would). How much decides how parallel (e) and (f) are: at the default x15
(e) decodes the 256 tokens in 40 steps; at x10 in 256 (one a step), at x30 in 8 (a block a
step). Same weights everywhere; float32.

Every leg is compiled first; then the legs run in turn, round after round (a b c d e f a b ...),
so that load on a shared machine falls on all of them alike; each ratio is taken within a round
and reported as the median and range over rounds. (a) and (b) run --ratio_steps steps and are
scaled to --steps (their steps all cost the same).
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
from jax_step import image_prompt  # benchmarks/jax_step.py

from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.diffusion import sampler
from lladav_jax.diffusion.options import SamplerOptions, SpecialIds
from lladav_jax.models import hf_params, lladav, variants


def build(variant: str, sharpen: float, attention: str = "auto", torch_attn: str = "sdpa"):
    """(cfg, the reference's model, ours) with the same random weights. `torch_attn`: the
    reference's attention, `sdpa` as the official LLaDA model runs by default (its
    LLaDASdpaAttention: torch's fused kernel) or `eager` (torch_reference's, for exactness in
    tests; on this CPU it made the reference 1.9x slower)."""
    cfg = variants.model_config(variant)
    cfg.attention_impl = attention
    config = ref.onevision_config(cfg)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = torch_attn
    hf = ref.randomize(transformers.LlavaOnevisionForConditionalGeneration(config), scale=0.02)
    with torch.no_grad():
        hf.lm_head.weight.mul_(sharpen)
    model = lladav.LLaDAV(cfg, rngs=nnx.Rngs(0))
    hf_params.load_hf(model, ref.official_from_onevision(hf, cfg),
                      hf_params.lladav_entries(cfg), cfg)
    return cfg, hf, model


def time_torch(hf, tokens, img, starts, ids, options: SamplerOptions) -> float:
    """Seconds of one answer by the PyTorch reference."""
    s = img.tiles.shape
    pixels = torch.from_numpy(img.tiles.transpose(0, 3, 1, 2).copy()).reshape(1, *s[:1], 3,
                                                                               *s[1:3])
    is_image = np.zeros(tokens.shape, bool)
    is_image[0, starts[0] : starts[0] + img.layout.num_tokens] = True
    images = (pixels, torch.tensor([[img.size[1], img.size[0]]]), is_image)
    start = time.perf_counter()
    ref.generate(hf, tokens, np.ones_like(tokens, bool), mask_id=ids.mask, eot_id=-1,
                 forbidden=ids.forbidden, images=images, gen_length=options.gen_length,
                 steps=options.steps, block_length=options.block_length)
    return time.perf_counter() - start


def legs(args, base: SamplerOptions) -> dict[str, tuple[str, SamplerOptions, float]]:
    """name -> (who runs it, options, the factor its seconds are scaled by). (a) and (b) run at
    --ratio_steps and are scaled to --steps: an uncached step is the same full-sequence forward
    whatever the step, so its time is linear in steps, and the two compare at equal work."""
    few = dataclasses.replace(base, steps=args.ratio_steps or base.steps)
    scale = base.steps / few.steps
    thr = args.threshold
    return {k: v for k, v in {
        "a": ("torch", few, scale),
        "b": ("ours", few, scale),
        "c": ("ours", dataclasses.replace(base, cache="prefix"), 1.0),
        "d": ("ours", dataclasses.replace(base, cache="dual"), 1.0),
        "e": ("ours", dataclasses.replace(base, cache="dual", threshold=thr), 1.0),
        "f": ("ours", dataclasses.replace(base, cache="adaptive", threshold=thr,
                                          refresh_threshold=args.refresh_threshold), 1.0),
    }.items() if k in args.legs.split(",")}


NAMES = {"a": "PyTorch reference", "b": "ours, no cache", "c": "ours, prefix cache",
         "d": "ours, dual cache", "e": "ours, dual + threshold",
         "f": "ours, adaptive + threshold"}


def spread(values) -> str:
    v = np.asarray(values, float)
    return f"{np.median(v):.2f} ({v.min():.2f}-{v.max():.2f})"


def add_setting_args(ap: argparse.ArgumentParser) -> None:
    """The setting's flags (model, image, answer), shared with cpu_ceiling.py."""
    ap.add_argument("--variant", default="small")
    ap.add_argument("--image_size", type=int, default=384)
    ap.add_argument("--gen_length", type=int, default=256)
    ap.add_argument("--block_length", type=int, default=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setting_args(ap)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--refresh_threshold", type=float,
                    default=SamplerOptions.defaults()["refresh_threshold"])
    ap.add_argument("--sharpen", type=float, default=15.0, help="the head's weights times this")
    ap.add_argument("--attention", default="auto",
                    help="our attention_impl (auto: chunked on the CPU)")
    ap.add_argument("--torch_attn", default="sdpa", choices=("sdpa", "eager"),
                    help="the reference's attention (sdpa: the official model's default)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every leg, interleaved")
    ap.add_argument("--legs", default="a,b,c,d,e,f", help="which of a-f to run")
    ap.add_argument("--ratio_steps", type=int, default=8,
                    help="(a) and (b) run this many steps (a multiple of the block count), "
                         "scaled to --steps (0: --steps)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    tok = load_demo_tokenizer()
    cfg, hf, model = build(args.variant, args.sharpen, args.attention, args.torch_attn)
    img, tokens, starts, visual = image_prompt(cfg, tok, args.image_size)
    ids = dataclasses.replace(SpecialIds.from_tokenizer(tok), eot=-1)  # no early stop
    base = SamplerOptions(gen_length=args.gen_length, steps=args.steps,
                          block_length=args.block_length)
    prompt = dict(tokens=tokens, valid=np.ones_like(tokens, bool), **visual)
    print(f"{args.variant}: prompt {tokens.shape[1]} tokens ({img.layout.num_tokens} visual), "
          f"answer {args.gen_length} in blocks of {args.block_length}, {args.steps} steps; "
          f"attention {args.attention} (reference {args.torch_attn}); jax {jax.__version__} "
          f"on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads; {args.repeats} rounds, legs interleaved")
    plan = legs(args, base)
    runs, compile_s, counts = {}, {}, {}
    for name, (who, options, scale) in plan.items():  # compile (and warm) every leg first
        counts[name] = (round(options.steps * scale),) * 2  # uncached: every step a full pass
        if who == "ours":
            runs[name] = sampler.compiled_generate(model, options, ids)
            start = time.perf_counter()
            out = jax.block_until_ready(runs[name](prompt, jax.random.key(0)))
            compile_s[name] = time.perf_counter() - start
            if scale == 1:
                counts[name] = (int(out["steps"]), int(out["refreshes"]))
    seconds = {name: [] for name in plan}
    for r in range(args.repeats):
        for name, (who, options, scale) in plan.items():
            if who == "torch":
                t = time_torch(hf, tokens, img, starts, ids, options)
            else:
                start = time.perf_counter()
                jax.block_until_ready(runs[name](prompt, jax.random.key(0)))
                t = time.perf_counter() - start
            seconds[name].append(t * scale)
            print(f"round {r + 1}: ({name}) {NAMES[name]}: {t:.2f} s"
                  + (f" x {scale:g}" if scale != 1 else ""), flush=True)
    print(f"\n{'run':34s} {'s/answer, median (min-max)':>28s} {'steps':>6s} {'full':>5s} "
          f"{'vs (a)':>18s} {'vs (b)':>18s}")
    result = {}
    for name, times in seconds.items():
        # Ratios within a round (legs minutes apart at most), then their median and spread.
        vs = {k: spread([a / t for a, t in zip(seconds[k], times, strict=True)])
              for k in ("a", "b") if k in seconds}
        steps, full = counts[name]
        print(f"({name}) {NAMES[name]:30s} {spread(times):>28s} {steps:6d} {full:5d} "
              f"{vs.get('a', '-'):>18s} {vs.get('b', '-'):>18s}")
        result[name] = dict(name=NAMES[name], seconds=times, steps=steps, full_passes=full,
                            compile=compile_s.get(name), vs=vs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
