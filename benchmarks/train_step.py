"""Train-step speed on the CPU: our jitted step against a PyTorch eager step of the same model.

    python benchmarks/train_step.py [--variant small] [--rows 1] [--seq_len 2048]
        [--repeats 3] [--warmup 1] [--torch_attn sdpa [eager]] [--no-tiny] [--components]
        [--legs xla:0 chunked:0 chunked:2048]
    # 1b: one framework per process (torch keeps freed memory in the process: two copies of a
    # 1B model with AdamW do not fit 24 GB), then compare the two reports
    python benchmarks/train_step.py --variant 1b --seq_len 1024 --repeats 2 --sequential \
        --no-tiny --no-ours
    python benchmarks/train_step.py --variant 1b --seq_len 1024 --repeats 2 --sequential \
        --no-tiny --torch_attn

The batch: `rows` rows of `seq_len` tokens, each row one sample with one square image of the
tile size (AnyRes: base tile + a 1x1 grid = 2 tiles; for `small`, 384 px, 729 + 27 x 28 = 1485
visual tokens), a 40-token prompt around it and answer tokens (the masked-diffusion targets)
filling the rest of the row; no padding. The vision tower runs on the 2 real tiles (the
trainer's batches pad every row to `image.max_tiles`). Both steps do the same work: forward
masking (one t per sample), SigLIP, the connector, LLaDA over the whole row (bidirectional),
the loss of docs/design.md §4.1 over the full-vocabulary logits, the backward pass, global-norm
clipping at 1.0 and AdamW with the stage-2/3 per-part learning rates (everything trains), all
in float32, from the same initial hf_params.

- Ours: `lladav_jax.train.step.make_train_step` under `jax.jit` with the state donated, as
  the trainer runs it (one micro-batch), compiled ahead of the timed steps.
- PyTorch eager (`benchmarks/torch_step.py`): transformers'
  `LlavaOnevisionForConditionalGeneration` configured as in `torch_reference` (Llama made
  bidirectional by an all-zero 4-D mask), trimmed to what LLaDA-V runs (SigLIP's last layer and
  pooling head removed, features read at the new last layer, as the official code does), the
  same loss written in torch, `clip_grad_norm_` and `torch.optim.AdamW` (foreach) with the same
  per-part learning rates. Attention: `--torch_attn sdpa` (transformers' default) and/or `eager`
  (as torch_reference's). For `tiny` the logits of both models are compared first (same weights,
  same batch).

`--legs`: our step in several forms, each `attention_impl:train.head_chunk` (default the
model's xla attention and the head at every position); a ratio "X / Y" is X's time over Y's,
so torch's time over ours is our speed-up.

All steps are timed interleaved (ours, torch, ours, torch, ...) so that other jobs on a shared
machine slow each alike; a figure is the median of `--repeats` steps after `--warmup` untimed
ones. Each step also records its process CPU time (all threads) and the load average: on a
shared machine CPU-seconds per step are the steadier measure of the work done.
MFU = `flops.flops_per_step` / step time / the CPU's float32 matmul peak
(`metrics.measure_peak_flops`, best of 5 tries before and after the steps); "MFU per
CPU-second" divides FLOPs per CPU-second of the step by the same matmul's FLOPs per
CPU-second. torch runs as many threads as JAX's CPU client (the usable cores).
`tiny` (16 x 256 tokens, a 56 px image per row, 10 repeats) runs first unless `--no-tiny`.
`--components` times, instead of the steps, one layer's attention and the head + cross-entropy
(each forward and backward) at the same shapes, ours against torch's.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from jax_step import LRS, JaxStep, make_batch  # benchmarks/jax_step.py
from torch_step import TorchStep, torch_peak_flops  # benchmarks/torch_step.py
from train_components import components, timed  # benchmarks/train_components.py

from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.models import (
    flops,
    hf_params,
    lladav,
    variants,
)
from lladav_jax.train import metrics
from lladav_jax.train.step import MODEL_KEYS

# ------------------------------------------------------------------------------ measurement


def peak_flops(tries: int = 5) -> float:
    """Best of several `metrics.measure_peak_flops` runs (jitted 1024^2 matmul, wall clock)."""
    return max(metrics.measure_peak_flops() for _ in range(tries))


def peak_flops_per_cpu_second(size: int = 1024, repeats: int = 5, tries: int = 5) -> dict:
    """The same matmul per CPU-second (process time over all threads), jax and torch: less
    sensitive to other jobs than wall clock, which only counts the time we were given."""
    x = jax.random.normal(jax.random.key(0), (size, size))
    f = jax.jit(lambda a: a @ a)
    t = torch.from_numpy(np.array(x))
    runs = {"jax": lambda: f(x).block_until_ready(), "torch": lambda: t @ t}
    out = {}
    for name, run in runs.items():
        run()
        best = float("inf")
        for _ in range(tries):
            start = time.process_time()
            for _ in range(repeats):
                run()
            best = min(best, time.process_time() - start)
        out[name] = 2 * size**3 * repeats / best
    return out


def jax_cpu_threads() -> int:
    """Threads of JAX's CPU client: XLA's Eigen pool is as large as the usable cores."""
    return len(os.sched_getaffinity(0))


def check_same_model(ours, theirs: TorchStep, batch: dict) -> float:
    """Max |logits difference| / max |logits| of one forward pass (no masking), both models."""
    logits = np.asarray(nnx.jit(lambda m, b: m(**b))(
        ours, {k: batch[k] for k in MODEL_KEYS if k in batch}))
    with torch.no_grad():
        want = theirs.model(input_ids=theirs.tokens, pixel_values=theirs.pixels,
                            image_sizes=theirs.image_sizes, attention_mask=theirs.mask4d,
                            position_ids=theirs.positions, use_cache=False).logits.numpy()
    return float(np.abs(logits - want).max() / np.abs(want).max())


def leg_specs(legs: list[str], cfg) -> dict[str, tuple[str, int]]:
    """Our legs by name, from `IMPL:HEAD_CHUNK` specs ("ours" alone for the default one)."""
    specs = [(s.split(":")[0], int(s.split(":")[1])) for s in legs]
    if specs == [(cfg.attention_impl, 0)]:
        return {"ours": specs[0]}
    return {f"ours-{impl}-h{chunk}": (impl, chunk) for impl, chunk in specs}


def leg_model(model, cfg, impl: str):
    """A copy of `model` (its own buffers: each leg donates its state) running `impl`."""
    other = copy.deepcopy(cfg)
    other.attention_impl = impl
    out = lladav.abstract(other)
    nnx.update(out, jax.tree.map(jnp.array, nnx.state(model)))
    return out


def bench(variant: str, rows: int, seq_len: int, image_px: int, repeats: int, warmup: int,
          attns: list[str], check: bool, sequential: bool = False, ours: bool = True,
          legs: tuple[str, ...] = ("xla:0",)) -> dict:
    cfg, batch, info = make_batch(variants.model_config(variant), rows, seq_len, image_px)
    tiles = rows * info["tiles_per_row"]
    step_flops = flops.flops_per_step(cfg, (rows, seq_len), tiles)
    print(f"\n== {variant}: {rows} x {seq_len} tokens, {tiles} tiles of "
          f"{cfg.vision.image_size}px ({info['visual_tokens']} visual + "
          f"{info['answer_tokens']} answer tokens per row); {step_flops / 1e12:.4f} TFLOP/step",
          flush=True)
    if sequential:
        return bench_sequential(cfg, batch, info, attns, repeats, warmup, ours, dict(
            variant=variant, rows=rows, seq_len=seq_len, tiles=tiles, flops=step_flops, info=info))
    theirs = {f"torch-{a}": TorchStep(cfg, batch, info, a, LRS) for a in attns}
    model = lladav.create(cfg, seed=0)
    if theirs:  # the same initial weights as torch's (all torch models are seeded alike)
        first = next(iter(theirs.values()))
        hf_params.load_hf(model, ref.official_from_onevision(first.model, cfg),
                        hf_params.lladav_entries(cfg), cfg)
        for name, step in theirs.items():
            if check:
                print(f"{name}: logits differ from ours by "
                      f"{check_same_model(model, step, batch):.1e} (relative)", flush=True)
    mine = {name: JaxStep(leg_model(model, cfg, impl), batch, info["mask_id"], chunk)
            for name, (impl, chunk) in leg_specs(legs, cfg).items()}
    del model
    for name, step in mine.items():
        print(f"{name}: {step.num_params / 1e6:.2f}M params, compiled in {step.compile_s:.1f} s",
              flush=True)
    ours = next(iter(mine.values()))
    for name, step in theirs.items():
        assert step.num_params == ours.num_params, (name, step.num_params, ours.num_params)
    steps = {**mine, **theirs}
    runs = {name: [] for name in steps}
    # Interleaved, so that other jobs on a shared machine slow all alike.
    for i in range(warmup + repeats):
        for name, step in steps.items():
            t = _timed_step(name, step, warm=i < warmup)
            if i >= warmup:
                runs[name].append(t)
    return dict(variant=variant, rows=rows, seq_len=seq_len, tiles=tiles, flops=step_flops,
                info=info, compile_s=ours.compile_s, params=ours.num_params, runs=runs)


def _timed_step(name: str, step, warm: bool) -> dict:
    """One step timed, and its line printed."""
    t = timed(step)
    print(f"  {'warm-up' if warm else 'step   '} {name:11s} {t['wall']:8.3f} s "
          f"wall {t['cpu']:8.3f} s CPU  load {t['load']:4.1f}  "
          f"loss {step.losses[-1]:.3f}", flush=True)
    return t


def _time_steps(name: str, step, repeats: int, warmup: int) -> list[dict]:
    """`warmup` untimed steps, then the timings of `repeats`."""
    runs = []
    for i in range(warmup + repeats):
        t = _timed_step(name, step, warm=i < warmup)
        if i >= warmup:
            runs.append(t)
    return runs


def bench_sequential(cfg, batch: dict, info: dict, attns: list[str], repeats: int,
                     warmup: int, run_ours: bool, res: dict) -> dict:
    """One framework at a time, each freed before the next is built: for models whose two
    copies (parameters, gradients, AdamW moments) do not fit in memory together. Each side
    starts from its own random weights (the logits check is `tiny`'s job)."""
    runs = {}
    for attn in attns:
        step = TorchStep(cfg, batch, info, attn, LRS)
        runs[f"torch-{attn}"] = _time_steps(f"torch-{attn}", step, repeats, warmup)
        num_params = step.num_params
        del step
        gc.collect()
    if not run_ours:
        return dict(res, compile_s=float("nan"), params=num_params, runs=runs)
    ours = JaxStep(lladav.create(cfg, seed=0), batch, info["mask_id"])
    print(f"ours: {ours.num_params / 1e6:.2f}M params, compiled in {ours.compile_s:.1f} s",
          flush=True)
    if attns:
        assert num_params == ours.num_params, (num_params, ours.num_params)
    runs = {"ours": _time_steps("ours", ours, repeats, warmup), **runs}
    return dict(res, compile_s=ours.compile_s, params=ours.num_params, runs=runs)


def report(res: dict, peak: float, cpu_peak: float) -> None:
    tokens = res["rows"] * res["seq_len"]
    print(f"\n{res['variant']}: {res['rows']} x {res['seq_len']} tokens, {res['tiles']} tiles, "
          f"{res['flops'] / 1e12:.4f} TFLOP/step (flops.flops_per_step); "
          f"ours compiled in {res['compile_s']:.1f} s")
    med = {}
    for name, runs in res["runs"].items():
        wall = [r["wall"] for r in runs]
        med[name] = m = statistics.median(wall)
        cpu = statistics.median(r["cpu"] for r in runs)
        load = statistics.median(r["load"] for r in runs)
        print(f"  {name:11s} {m:8.3f} s/step median (min {min(wall):.3f}, max {max(wall):.3f}, "
              f"n={len(wall)}); {tokens / m:,.0f} tokens/s; {res['flops'] / m / 1e9:.1f} GFLOP/s; "
              f"MFU {res['flops'] / m / peak:.1%}; {cpu:.2f} CPU-s/step, "
              f"MFU per CPU-second {res['flops'] / cpu / cpu_peak:.1%}; load {load:.1f}")
    cpu = {name: statistics.median(r["cpu"] for r in runs) for name, runs in res["runs"].items()}
    mine = [name for name in med if name.startswith("ours")]
    for a in mine:
        for b in med:
            if b != a and not (b in mine and mine.index(b) < mine.index(a)):
                print(f"  {b} / {a}: {med[b] / med[a]:.2f} (median wall time), "
                      f"{cpu[b] / cpu[a]:.2f} (median CPU-seconds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="small")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--image_px", type=int, default=0, help="default: the tile size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--torch_attn", nargs="*", default=["sdpa"], choices=("sdpa", "eager"),
                        help="transformers attention implementations to time (none: ours only)")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True,
                        help="also `tiny`: 16 x 256 tokens, a 56px image per row, 10 repeats")
    parser.add_argument("--ours", action=argparse.BooleanOptionalAction, default=True,
                        help="with --sequential: also time ours (--no-ours: torch only)")
    parser.add_argument("--sequential", action="store_true",
                        help="time one framework at a time (models too big for two copies)")
    parser.add_argument("--legs", nargs="+", default=["xla:0"],
                        help="our steps as IMPL:HEAD_CHUNK (attention_impl, train.head_chunk), "
                             "each timed interleaved with the others, e.g. xla:0 chunked:2048")
    parser.add_argument("--components", action="store_true",
                        help="instead of the steps, time attention and head + CE alone")
    args = parser.parse_args()

    threads = jax_cpu_threads()
    torch.set_num_threads(threads)
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}, {threads} threads), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}; load average {os.getloadavg()[0]:.2f}", flush=True)
    peaks = [peak_flops()]
    cpu_peaks = [peak_flops_per_cpu_second()]
    print(f"matmul peak: {peaks[0] / 1e9:.1f} GFLOP/s (torch {torch_peak_flops() / 1e9:.1f}); "
          f"per CPU-second: jax {cpu_peaks[0]['jax'] / 1e9:.1f}, "
          f"torch {cpu_peaks[0]['torch'] / 1e9:.1f}", flush=True)
    cfg = variants.model_config(args.variant)
    if args.components:
        components(cfg, args.rows, args.seq_len)
        return
    results = []
    if args.tiny:
        results.append(bench("tiny", 16, 256, 56, 10, 2, args.torch_attn, check=True))
    results.append(bench(args.variant, args.rows, args.seq_len,
                         args.image_px or cfg.vision.image_size, args.repeats, args.warmup,
                         args.torch_attn, check=False, sequential=args.sequential,
                         ours=args.ours, legs=tuple(args.legs)))
    peaks.append(peak_flops())
    cpu_peaks.append(peak_flops_per_cpu_second())
    peak, cpu_peak = max(peaks), max(c["jax"] for c in cpu_peaks)
    print(f"\nmatmul peak after: {peaks[1] / 1e9:.1f} GFLOP/s (torch "
          f"{torch_peak_flops() / 1e9:.1f}); per CPU-second: jax {cpu_peaks[1]['jax'] / 1e9:.1f}, "
          f"torch {cpu_peaks[1]['torch'] / 1e9:.1f}; load average {os.getloadavg()[0]:.2f}")
    print(f"MFU against {peak / 1e9:.1f} GFLOP/s (the better of before/after); MFU per "
          f"CPU-second against {cpu_peak / 1e9:.1f} GFLOP per CPU-second")
    for res in results:
        report(res, peak, cpu_peak)


if __name__ == "__main__":
    main()
