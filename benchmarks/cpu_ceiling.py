"""How fast can ours be on this CPU at most? The FLOPs a step must do, over the matmul peak.

    python benchmarks/cpu_ceiling.py              # small config, 2-core CPU: ~8 minutes
    python benchmarks/cpu_ceiling.py --repeats 1 --variant tiny --seq_len 256 --image_size 56

Two of the speed targets compare ours with PyTorch on the CPU: the uncached sampler against
the reference (benchmarks/sampler.py, legs a and b) and the train step against a PyTorch eager
step (benchmarks/train_step.py). However well ours runs, a step cannot take less than the
floor = the FLOPs it must do / the machine's float32 matmul peak (the faster of XLA's and
torch's, measured in the same round). So the best ratio any implementation can reach is
PyTorch's seconds / our floor: the ceiling. A target above the ceiling cannot be met on this
machine in float32.

The FLOPs ours must do (`models/flops.py`, forward = training / 3):
- a sampler step without a cache: the text model's forward over the whole sequence (prompt +
  answer), every position attending to all, and the head over the block's positions only (the
  sampler's logits); the image is encoded once per answer, not counted;
- a train step: `flops_per_step` of the batch with the head only at the answer positions (at
  most what the head where the loss is computes).

Each round runs, in turn: the matmul peak (float32 [2048, 2048] products, XLA's and torch's,
the best of 5 runs of 10; XLA's bfloat16 beside it, for reference), the reference's uncached
sampler (8 steps; torch's fused attention, as the official model), ours (8 steps), PyTorch's
eager train step and ours (chunked attention, the head where the loss is), so that load falls
on all alike. Ratios are taken within a round: median (range) over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
from jax_step import LRS, JaxStep, image_prompt, make_batch  # benchmarks/jax_step.py
from sampler import add_setting_args, build, spread, time_torch  # benchmarks/sampler.py
from torch_step import TorchStep, torch_peak_flops  # benchmarks/torch_step.py
from train_step import leg_model  # benchmarks/train_step.py

from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.diffusion import sampler as diffusion_sampler  # not benchmarks/sampler.py
from lladav_jax.diffusion.options import SamplerOptions, SpecialIds
from lladav_jax.models import flops
from lladav_jax.models.config import ModelConfig
from lladav_jax.train import metrics


def matmul_peak(dtype: str, size: int = 2048, repeats: int = 10, tries: int = 5) -> float:
    """The CPU's matmul FLOP/s at `dtype`, wall clock: the best of `tries` runs of `repeats`
    products, by XLA and (float32) by torch's MKL, whichever is faster: the floor is the
    machine's, not one library's."""
    best = max(metrics.measure_peak_flops(size, repeats, dtype) for _ in range(tries))
    if dtype == "float32":
        best = max(best, torch_peak_flops(size, repeats, tries))
    return best


def sampler_step_flops(cfg, length: int, block: int) -> float:
    """Forward FLOPs of an uncached sampler step: the text model over `length` positions, the
    head over `block` of them."""
    t = ModelConfig.from_config(cfg).text
    every = flops.model_flops(cfg, length, length, 0) / 3  # the head at every position
    return every - 2 * t.hidden_size * t.vocab_size * (length - block)


def train_step_flops(cfg, seq_len: int, tiles: int, answer: int) -> float:
    """Training FLOPs of one row with the head at its `answer` positions only."""
    t = ModelConfig.from_config(cfg).text
    every = flops.flops_per_step(cfg, (1, seq_len), tiles)
    return every - 6 * t.hidden_size * t.vocab_size * (seq_len - answer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setting_args(ap)
    ap.add_argument("--sampler_steps", type=int, default=8, help="steps timed per answer")
    ap.add_argument("--seq_len", type=int, default=2048, help="the train step's row")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, the legs interleaved")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    tok = load_demo_tokenizer()
    cfg, hf, model = build(args.variant, sharpen=15.0)
    img, tokens, starts, visual = image_prompt(cfg, tok, args.image_size)
    ids = dataclasses.replace(SpecialIds.from_tokenizer(tok), eot=-1)  # every step runs
    options = SamplerOptions(gen_length=args.gen_length, steps=args.sampler_steps,
                             block_length=args.block_length)
    prompt = dict(tokens=tokens, valid=np.ones_like(tokens, bool), **visual)
    ours_sampler = diffusion_sampler.compiled_generate(model, options, ids)
    jax.block_until_ready(ours_sampler(prompt, jax.random.key(0)))
    length = tokens.shape[1] + args.gen_length

    step_cfg, batch, info = make_batch(cfg, 1, args.seq_len, args.image_size)
    torch_step = TorchStep(step_cfg, batch, info, "sdpa", LRS)
    step_model = leg_model(model, step_cfg, "chunked")  # the sampler's weights
    ours_step = JaxStep(step_model, batch, info["mask_id"], head_chunk=1024)
    ours_step()  # warm

    pass_flops = sampler_step_flops(cfg, length, args.block_length)
    step_flops = train_step_flops(step_cfg, args.seq_len, info["tiles_per_row"],
                                  info["answer_tokens"])
    print(f"{args.variant}: sampler step over {length} positions {pass_flops / 1e9:.1f} GFLOP; "
          f"train step of 1 x {args.seq_len} ({info['answer_tokens']} answer tokens) "
          f"{step_flops / 1e9:.1f} GFLOP; jax {jax.__version__}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)

    rows = {k: [] for k in ("peak", "peak_bf16", "ref", "ours_pass", "torch_step", "ours_step")}
    for r in range(args.repeats):
        rows["peak"].append(matmul_peak("float32"))
        rows["peak_bf16"].append(matmul_peak("bfloat16"))
        rows["ref"].append(time_torch(hf, tokens, img, starts, ids, options) / options.steps)
        start = time.perf_counter()
        jax.block_until_ready(ours_sampler(prompt, jax.random.key(0)))
        rows["ours_pass"].append((time.perf_counter() - start) / options.steps)
        for name, step in (("torch_step", torch_step), ("ours_step", ours_step)):
            start = time.perf_counter()
            step()
            rows[name].append(time.perf_counter() - start)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] / 1e9:.1f} GFLOP/s" if "peak" in k
                                             else f"{k} {v[-1]:.2f} s"
                                             for k, v in rows.items()), flush=True)

    peak = np.asarray(rows["peak"])
    floor_pass, floor_step = pass_flops / peak, step_flops / peak
    ref, ours_pass = np.asarray(rows["ref"]), np.asarray(rows["ours_pass"])
    torch_s, ours_s = np.asarray(rows["torch_step"]), np.asarray(rows["ours_step"])
    print(f"\nfloat32 matmul peak {spread(peak / 1e9)} GFLOP/s (bfloat16 "
          f"{spread(np.asarray(rows['peak_bf16']) / 1e9)}); median (range) over "
          f"{args.repeats} rounds\n")
    print("| | PyTorch s | ours s | our floor s | ours / floor | ours vs PyTorch | ceiling |")
    print("|---|---|---|---|---|---|---|")
    for name, theirs, ours, floor in (("sampler step, no cache", ref, ours_pass, floor_pass),
                                      ("train step", torch_s, ours_s, floor_step)):
        print(f"| {name} | {spread(theirs)} | {spread(ours)} | {spread(floor)} | "
              f"{spread(ours / floor)} | {spread(theirs / ours)}x | {spread(theirs / floor)}x |")


if __name__ == "__main__":
    main()
