"""Input pipeline throughput (samples per second, one process) and padding fraction.

    python benchmarks/data.py [--samples 256] [--workers 2] [--window 32] [--batch_size 4]
        [--seq_len 4096] [--variant small] [--max_scale 4] [--max_tiles N]
        [--max_visual_tokens 4096] [--modes plain,grouped,packed] [--hosts 16,32,64]

Runs the real pipeline (`make_dataset`: shuffle -> windows -> `Featurizer` -> rows -> batches)
on the built-in synthetic data set with the demo tokenizer and the chat template, for each
batching mode (`plain`: one sample a row, no grouping; `grouped`: length grouping into the
default buckets seq_len/4, /2, /1; `packed`: first-fit packing with segment ids), once with the
featurizer in this process (0 workers, the baseline) and once with `--workers` Grain worker
processes. Reports delivered samples per second (wall time from creating the iterator to the
last batch, worker start-up included; and "steady", from the arrival of each worker's first
window to the end), CPU time per sample (this process + its joined workers: less sensitive to
other jobs on a shared machine), skips by reason, and the padding fraction (token positions
with segment id 0). The batches of both runs are checked to be identical (a digest of every
array, pixels subsampled). About 1.5 minutes on 2 lightly shared cores.

AnyRes with the chosen variant's image geometry (`small`: 384 px tiles, max_tiles 10): the
synthetic images are 60-300 px, smaller than one tile, so each is upscaled by a factor drawn
per sample from [1, max_scale] (nearest neighbour, re-encoded as PNG) to get grids from 1x1 to
3x3 and more. The raw samples (PNG bytes) are made once, before timing, and held in memory, like
records read from ArrayRecord: the timed work is decode -> AnyRes tiles -> tokens -> batches.
`max_visual_tokens` is raised to `--max_visual_tokens` (the `small` default of 3200 would skip
the largest images); samples that still do not fit are skipped and counted.

`--hosts H1,H2,...` times one host of H instead: it reads and measures every sample, plans the
global batches (`--batch_size` rows) and featurizes only its rows (the first batch_size / H);
0 workers, the first mode. A fit of CPU seconds = m x samples + f x featurized over the runs
gives the global samples/s one host (one core) keeps up with on v5p-64 and v6e-256, next to
what the 8b stage-2 step consumes there (configs/stage2a.py, `lladav-plan`'s 45% MFU step
time). E.g. `--variant 8b --max_visual_tokens 0 --seq_len 8192 --batch_size 256 --window 256
--samples 2048 --modes grouped --hosts 8,32,128` (0: the variant's own limit; a window of one
batch keeps the memory of 8 hosts' 32 rows of 37 float32 tiles at ~2 GB a window).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import os
import time

import ml_collections
import numpy as np
from PIL import Image

from lladav_jax.data import pipeline, synthetic
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.example import SKIP_REASONS
from lladav_jax.data.featurize import Featurizer
from lladav_jax.data.layout import best_grid
from lladav_jax.models import variants

MODES = {
    "plain": dict(pack=False, group_by_length=False),
    "grouped": dict(pack=False, group_by_length=True),
    "packed": dict(pack=True, group_by_length=False),
}


def make_raw_samples(n: int, max_scale: float, seed: int) -> list[dict]:
    """Synthetic samples with each image upscaled by a per-sample factor in [1, max_scale]."""
    source = synthetic.SyntheticSource(n, split="train", seed=seed)
    raws = []
    for i in range(n):
        raw = source[i]
        k = np.random.default_rng([seed, 7, i]).uniform(1.0, max_scale)
        if k > 1.0:
            image = Image.open(io.BytesIO(raw["images"][0]))
            size = (round(image.width * k), round(image.height * k))
            raw["images"] = [synthetic.png_bytes(image.resize(size, Image.NEAREST))]
        raws.append(raw)
    return raws


def settings(args, mode: str, workers: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, num_epochs=1,
             window=args.window, num_workers=workers, max_skip_fraction=1.0,
             min_seen_for_abort=1, length_buckets=None, **MODES[mode])
    )  # fmt: skip


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children: the Grain workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(raws, featurize, cfg, data, pad_id: int, rows=None) -> dict:
    """Iterates one epoch holding `rows` of each batch (None: all); returns timings, counts,
    padding and a digest of all batches."""
    digest = hashlib.sha256()
    skips: collections.Counter = collections.Counter()
    segments, delivered, n_batches, first, warm = [], 0, 0, None, None
    # Steady state: from the arrival of the first windows (one per worker; each needs the
    # start-up) to the end. Batches of a window arrive together; its skips ride on its first.
    warm_after = data.window * max(1, data.num_workers)
    cpu0, start = _cpu_seconds(), time.perf_counter()
    ds = pipeline.make_dataset(raws, featurize, cfg, data, pad_id=pad_id, rows=rows)
    it = iter(ds)
    for batch in it:
        if first is None:
            first = time.perf_counter()
        n_batches += 1
        delivered += int(batch["num_samples"])
        skips.update({r: int(n) for r, n in batch["skips"].items() if n})
        skips.update({r: int(n) for r, n in batch["local_skips"].items() if n})
        if warm is None and delivered + sum(skips.values()) >= warm_after:
            warm = (time.perf_counter(), delivered)
        # A copy (small; with workers the batch lives in shared memory, freed when dropped).
        segments.append({"segment_ids": np.array(batch["segment_ids"])})
        for key in sorted(k for k in batch if k not in ("skips", "local_skips")):
            # Pixels are ~95% of the bytes: hashing them all would cost as much as making
            # them, so the digest takes every 16th row and column of every tile.
            value = batch[key][..., ::16, ::16, :] if key == "pixels" else batch[key]
            digest.update(np.ascontiguousarray(value).tobytes())
    end = time.perf_counter()
    featurized = it.featurized
    it.close()  # stops and joins the workers: their CPU time is then counted
    del it, ds, batch
    cpu = _cpu_seconds() - cpu0
    wall = end - start
    return dict(
        wall=wall, first=(first or end) - start, delivered=delivered, batches=n_batches,
        featurized=featurized, cpu=cpu,
        rate=delivered / wall,
        steady=(delivered - warm[1]) / (end - warm[0]) if warm and end > warm[0] else float("nan"),
        cpu_ms=1e3 * cpu / max(delivered, 1),
        skips=skips, padding=pipeline.padding_fraction(segments), digest=digest.hexdigest(),
        lengths=sorted({s["segment_ids"].shape[1] for s in segments}),
    )  # fmt: skip


# Where the 8b stage-2 step times come from: `lladav-plan`'s estimate, analytic FLOPs of a
# configs/stage2a.py step at 45% MFU; TPU v5p and v6e multi-host slices have 4 chips a host.
TOPOLOGIES, PLAN_MFU, CHIPS_PER_HOST = ("v5p-64", "v6e-256"), 0.45, 4


def stage2_needs() -> list[tuple[str, int, float, float]]:
    """(topology, hosts, step s, global samples/s the step consumes) for configs/stage2a.py."""
    from lladav_jax.models import flops
    from lladav_jax.scale import topology
    from lladav_jax.train.defaults import sft_8b

    c = sft_8b()
    d = c.data
    step_flops = flops.flops_per_step(c.model, (d.batch_size, d.seq_len),
                                      d.batch_size * int(c.model.image.max_tiles))
    out = []
    for name in TOPOLOGIES:
        t = topology.parse(name)
        step_s = step_flops / (PLAN_MFU * t.peak_flops * t.chips)
        out.append((name, t.chips // CHIPS_PER_HOST, step_s, d.batch_size / step_s))
    return out


def per_host(args, hosts: list[int], mode: str, raws, featurize, cfg, pad_id: int) -> None:
    """One host of H: it reads and measures every sample and featurizes its rows (the first
    batch_size / H). CPU seconds = m x samples + f x featurized, fitted over the runs, gives
    the global samples/s one host keeps up with on any number of hosts."""
    if any(args.batch_size % h for h in hosts):
        raise SystemExit(f"--batch_size {args.batch_size} does not split over {hosts} hosts")
    # Untimed: the first pass warms Pillow's and the tokenizer's first-call costs.
    run(raws[: args.window], featurize, cfg, settings(args, mode, 0), pad_id,
        rows=list(range(args.batch_size // max(hosts))))
    runs = []
    for h in hosts:
        r = run(raws, featurize, cfg, settings(args, mode, 0), pad_id,
                rows=list(range(args.batch_size // h)))
        runs.append(r)
        print(f"  {h} hosts ({args.batch_size // h} rows each): {r['delivered']} samples planned "
              f"and {r['featurized']} featurized in {r['wall']:.1f} s = "
              f"{r['delivered'] / r['wall']:.1f} global samples/s, "
              f"{r['featurized'] / r['wall']:.1f} featurized/s; {r['cpu']:.1f} CPU s; skipped "
              f"{dict(r['skips']) or 'none'}; "
              f"load average {os.getloadavg()[0]:.1f}",
              flush=True)  # fmt: skip
    a = np.array([[r["delivered"], r["featurized"]] for r in runs], float)
    (m, f), *_ = np.linalg.lstsq(a, np.array([r["cpu"] for r in runs]), rcond=None)
    print(f"\nCPU per sample: measure (every host, every sample) {1e3 * m:.2f} ms, featurize "
          f"(its rows only) {1e3 * f:.1f} ms\n")
    print("| topology | hosts | step s (plan, 45% MFU) | global samples/s needed | per host: "
          "featurized/s needed | one host (1 core) keeps up with, global samples/s | headroom |")
    print("|---|---|---|---|---|---|---|")
    for name, n, step_s, need in stage2_needs():
        can = 1 / (m + f / n)
        print(f"| {name} | {n} | {step_s:.2f} | {need:.1f} | {need / n:.2f} | {can:.0f} | "
              f"{can / need:.1f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256, help="samples in the epoch timed")
    p.add_argument("--workers", type=int, default=2, help="Grain worker processes (vs 0)")
    p.add_argument("--window", type=int, default=32, help="samples grouped/packed together")
    p.add_argument("--batch_size", type=int, default=4, help="rows per (global) batch")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--variant", default="small", choices=variants.VARIANTS)
    p.add_argument("--max_scale", type=float, default=4.0, help="image upscale factor, max")
    p.add_argument("--max_tiles", type=int, default=None, help="default: the variant's")
    p.add_argument("--max_visual_tokens", type=int, default=4096)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hosts", default="", help="comma-separated host counts: time one host's "
                   "share instead (0 workers, the first mode)")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown modes {sorted(unknown)}")

    cfg = variants.model_config(args.variant)
    if args.max_tiles:
        cfg.image.max_tiles = args.max_tiles
    if args.max_visual_tokens:
        cfg.image.max_visual_tokens = args.max_visual_tokens
    tokenizer = load_demo_tokenizer()
    featurize = Featurizer(cfg, tokenizer, seq_len=args.seq_len)

    t = time.perf_counter()
    raws = make_raw_samples(args.samples, args.max_scale, args.seed)
    sizes = [Image.open(io.BytesIO(r["images"][0])).size for r in raws]
    tiles = collections.Counter(1 + int(np.prod(best_grid(s, cfg))) for s in sizes)
    print(f"{args.samples} synthetic samples made in {time.perf_counter() - t:.1f} s (untimed); "
          f"image sides {min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} px; "
          f"tiles per image (base + grid): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(tiles.items())))  # fmt: skip
    print(f"model {args.variant}: tile {cfg.vision.image_size} px, max_tiles "
          f"{cfg.image.max_tiles}, max_visual_tokens {cfg.image.max_visual_tokens}; seq_len "
          f"{args.seq_len}, batch {args.batch_size}, window {args.window}")  # fmt: skip

    if args.hosts:
        per_host(args, [int(h) for h in args.hosts.split(",")], modes[0], raws, featurize, cfg,
                 tokenizer.pad_id)
        return
    results = {}
    for mode in modes:
        for workers in dict.fromkeys((0, args.workers)):  # 0 (the baseline), then N
            data = settings(args, mode, workers)
            r = run(raws, featurize, cfg, data, tokenizer.pad_id)
            results[mode, workers] = r
            print(f"  {mode:8s} workers={workers}: {r['delivered']} samples in {r['wall']:.1f} s "
                  f"= {r['rate']:.1f}/s, {r['cpu_ms']:.0f} ms CPU each (first batch after "
                  f"{r['first']:.1f} s; then {r['steady']:.1f}/s); batch lengths "
                  f"{r['lengths']}; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

    n = args.workers
    print()
    print(
        f"| mode | samples/s, 0 workers | samples/s, {n} workers | ratio | steady samples/s, "
        f"0 / {n} workers | CPU ms/sample, 0 / {n} | padding | skipped | same batches |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        base, par = results[mode, 0], results[mode, n]
        skipped = ", ".join(f"{r} {base['skips'][r]}" for r in SKIP_REASONS if base["skips"][r])
        ratio = par["rate"] / base["rate"]
        same = "yes" if base["digest"] == par["digest"] else "NO"
        print(
            f"| {mode} | {base['rate']:.1f} | {par['rate']:.1f} | {ratio:.2f}x | "
            f"{base['steady']:.1f} / {par['steady']:.1f} | "
            f"{base['cpu_ms']:.0f} / {par['cpu_ms']:.0f} | {base['padding']:.3f} | "
            f"{skipped or 'none'} | {same} |"
        )


if __name__ == "__main__":  # Grain's worker processes re-import this module
    main()
