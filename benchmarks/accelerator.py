"""The accelerator suite: the 8b sampler and the `1b` train step on one GPU (or TPU), one table.

    python benchmarks/accelerator.py --out accelerator.json   # one chip: about 5 minutes
    python benchmarks/accelerator.py --smoke                  # tiny shapes, any machine, ~1 min

On the device machine lent to a session (grain and ml-collections are missing there: bring them
as wheels, `bash benchmarks/accelerator_wheels.sh` here once, into the ignored `.whl/`):

    run(carry=[".whl"], timeout_s=540, command="python3 -m pip install -q --no-index --no-deps
        --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/accelerator.py
        --out $OUT/accelerator.json")

Sampler: the 8b model (LLaDA-8B + SigLIP so400m) in bfloat16 with random weights, the head
sharpened (x30) so that confidences pass 0.9 as a trained model's do, the <|eot_id|> stop off
(every position decoded); one 384x384 image (AnyRes: 1485 visual tokens) and a question; a
128-token answer in blocks of 32, 128 steps: no cache, dual cache, dual + threshold 0.9 and
adaptive refresh + threshold 0.9. Each leg compiles first; then the legs run in turn, round
after round, and a figure is the median (range) of the rounds.

Train step: the `1b` model, bfloat16 compute, `--train_rows` rows of `--train_len` tokens with
one image each (benchmarks/jax_step.py), AdamW; tokens/s and MFU (analytic FLOPs,
`flops.flops_per_step`, over the chip's bf16 peak, `topology.CHIPS`) with the platform's fused
attention (cudnn on a GPU, splash on a TPU) and with `chunked`, steps interleaved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np
from jax_step import JaxStep, image_prompt, make_batch  # benchmarks/jax_step.py

from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.diffusion import sampler
from lladav_jax.diffusion.options import SamplerOptions, SpecialIds
from lladav_jax.models import flops, lladav, variants
from lladav_jax.scale import topology

FULL = dict(sampler_variant="8b", image_size=384, gen_length=128, block_length=32, steps=128,
            train_variant="1b", train_rows=4, train_len=4096, train_image=384)
SMOKE = dict(sampler_variant="tiny", image_size=112, gen_length=16, block_length=8, steps=16,
             train_variant="tiny", train_rows=2, train_len=256, train_image=56)


def spread(values) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def sampler_model(variant: str, sharpen: float):
    cfg = variants.model_config(variant)
    cfg.dtype = cfg.param_dtype = "bfloat16"
    cfg.attention_impl = "auto"
    model = lladav.create(cfg, seed=0)
    head = model.llm.lm_head.kernel
    head.value = head.value * sharpen
    return cfg, model


def bench_sampler(s: dict, threshold: float, repeats: int, sharpen: float) -> dict:
    cfg, model = sampler_model(s["sampler_variant"], sharpen)
    tok = load_demo_tokenizer()
    img, tokens, _, visual_inputs = image_prompt(cfg, tok, s["image_size"])
    prompt = dict(tokens=tokens, valid=np.ones_like(tokens, bool), **visual_inputs)
    visual = img.layout.num_tokens
    ids = dataclasses.replace(SpecialIds.from_tokenizer(tok), eot=-1)
    base = SamplerOptions(gen_length=s["gen_length"], block_length=s["block_length"],
                          steps=s["steps"])
    legs = {"no cache": base, "dual": dataclasses.replace(base, cache="dual"),
            f"dual + {threshold:g}": dataclasses.replace(base, cache="dual", threshold=threshold),
            f"adaptive + {threshold:g}": dataclasses.replace(base, cache="adaptive",
                                                             threshold=threshold)}
    print(f"sampler: {s['sampler_variant']} bf16, prompt {prompt['tokens'].shape[1]} tokens "
          f"({visual} visual), answer {base.gen_length} in blocks of {base.block_length}, "
          f"{base.steps} steps", flush=True)
    runs, out = {}, {}
    for name, options in legs.items():
        runs[name] = sampler.compiled_generate(model, options, ids)
        start = time.perf_counter()
        result = jax.block_until_ready(runs[name](prompt, jax.random.key(0)))
        out[name] = dict(compile_s=time.perf_counter() - start, seconds=[],
                         steps=int(result["steps"]), full_passes=int(result["refreshes"]))
        print(f"  {name}: first call (compile + run) {out[name]['compile_s']:.1f} s", flush=True)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run(prompt, jax.random.key(0)))
            out[name]["seconds"].append(time.perf_counter() - start)
    base_s = statistics.median(out["no cache"]["seconds"])
    for r in out.values():
        r["vs_no_cache"] = base_s / statistics.median(r["seconds"])
        r["tokens_per_s"] = base.gen_length / statistics.median(r["seconds"])
    return dict(prompt_tokens=int(prompt["tokens"].shape[1]), legs=out)


def fused_attention() -> str:
    return {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "xla")


def bench_train(s: dict, repeats: int) -> dict:
    cfg = variants.model_config(s["train_variant"])
    cfg.dtype = "bfloat16"
    cfg, batch, info = make_batch(cfg, s["train_rows"], s["train_len"], s["train_image"])
    tiles = s["train_rows"] * info["tiles_per_row"]
    step_flops = flops.flops_per_step(cfg, (s["train_rows"], s["train_len"]), tiles)
    chip = topology.chip_for_device_kind(jax.devices()[0].device_kind)
    peak = chip.peak_tflops * 1e12 if chip else None
    print(f"train: {s['train_variant']}, {s['train_rows']} x {s['train_len']} tokens, {tiles} "
          f"tiles; {step_flops / 1e12:.2f} TFLOP a step; peak "
          f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}", flush=True)
    steps, out = {}, {}
    for impl in (fused_attention(), "chunked"):
        leg = cfg.copy_and_resolve_references()
        leg.attention_impl = impl
        steps[impl] = JaxStep(lladav.create(leg, seed=0), batch, info["mask_id"])
        steps[impl]()  # the first step: warm
        out[impl] = dict(compile_s=steps[impl].compile_s, seconds=[])
        print(f"  {impl}: compiled in {steps[impl].compile_s:.1f} s", flush=True)
    for _ in range(repeats):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            out[impl]["seconds"].append(time.perf_counter() - start)
    for impl, r in out.items():
        t = statistics.median(r["seconds"])
        r["tokens_per_s"] = s["train_rows"] * s["train_len"] / t
        r["mfu"] = None if peak is None else step_flops / t / peak
        r["loss"] = steps[impl].losses[-1]
    return dict(flops_per_step=step_flops, peak_flops=peak, legs=out)


def table(res: dict) -> str:
    lines = [f"device: {res['device']} ({res['backend']}), jax {res['jax']}", "",
             "| sampler leg | s/answer, median (range) | tokens/s | steps | full passes | "
             "vs no cache | first call s |", "|---|---|---|---|---|---|---|"]
    for name, r in res["sampler"]["legs"].items():
        lines.append(f"| {name} | {spread(r['seconds'])} | {r['tokens_per_s']:.1f} | "
                     f"{r['steps']} | {r['full_passes']} | {r['vs_no_cache']:.2f}x | "
                     f"{r['compile_s']:.1f} |")
    lines += ["", "| train step attention | s/step, median (range) | tokens/s | MFU | "
              "compile s |", "|---|---|---|---|---|"]
    for impl, r in res["train"]["legs"].items():
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {impl} | {spread(r['seconds'])} | {r['tokens_per_s']:.0f} | {mfu} | "
                     f"{r['compile_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the suite runs")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of interleaved legs")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--sharpen", type=float, default=30.0)
    ap.add_argument("--skip", choices=("sampler", "train"), action="append", default=[])
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    shapes = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    res = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
               jax=jax.__version__, shapes=shapes)
    res["sampler"] = ({"legs": {}} if "sampler" in args.skip else
                      bench_sampler(shapes, args.threshold, args.repeats, args.sharpen))
    res["train"] = {"legs": {}} if "train" in args.skip else bench_train(shapes, args.repeats)
    res["wall_s"] = time.perf_counter() - start
    print("\n" + table(res) + f"\n\nwall {res['wall_s']:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
