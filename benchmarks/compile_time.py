"""Train-step compile time against depth: the text layers run in a scan, so 8 layers should
compile in about the time of 2 (docs/design.md §10.2).

    python benchmarks/compile_time.py [--variant small] [--layers 2 8] [--devices 1]
        [--seq_len 1024] [--rows_per_device 1] [--repeats 3] [--attention chunked]

Each run builds the step as `lladav-train` does (`lladav_jax.scale.plan.lower_train_step`: the
trainer's layout, shardings, donation) for the variant with `text.num_layers` set, on a
(data 1, fsdp -1, tensor 1) mesh of `--devices` simulated CPU devices, from ShapeDtypeStructs
(nothing allocated), and times tracing + lowering and XLA:CPU's compile separately. Runs are
interleaved (2, 8, 2, 8, ...) so that other jobs on a shared machine slow each alike; a figure
is the median of `--repeats`. Also printed: the lowered StableHLO's size in characters and the
compiled step's temporaries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="small", choices=("tiny", "small", "1b", "8b"))
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--rows_per_device", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", help="model.attention_impl (default: the variant's)")
    args = parser.parse_args()

    from lladav_jax.scale import plan

    plan.use_simulated_cpu_devices(args.devices)  # before JAX's backend starts
    import jax

    from lladav_jax.scale import sharding
    from lladav_jax.train.defaults import base_config

    def config(layers: int):
        c = base_config(args.variant)
        c.model.text.num_layers = layers
        if args.attention:
            c.model.attention_impl = args.attention
        c.data.seq_len = args.seq_len
        c.data.batch_size = args.rows_per_device * args.devices
        c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
        return c

    mesh = sharding.make_mesh(dict(config(1).mesh))
    print(f"jax {jax.__version__}, {args.devices} simulated CPU device(s), {os.cpu_count()} "
          f"cores, load average {os.getloadavg()[0]:.2f}; {args.variant} with text.num_layers "
          f"in {args.layers}, {args.rows_per_device * args.devices} x {args.seq_len} tokens, "
          f"attention {config(1).model.attention_impl}",
          flush=True)
    runs = {n: [] for n in args.layers}
    for i in range(args.repeats):
        for n in args.layers:
            start = time.perf_counter()
            lowered, *_ = plan.lower_train_step(config(n), mesh)
            lower_s = time.perf_counter() - start
            start = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - start
            temp = compiled.memory_analysis().temp_size_in_bytes
            runs[n].append(dict(lower=lower_s, compile=compile_s, hlo=len(lowered.as_text()),
                                temp=temp))
            print(f"  run {i + 1}: {n:3d} layers  lower {lower_s:6.2f} s  compile "
                  f"{compile_s:6.2f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\n{'layers':>6}  {'lower s':>8}  {'compile s':>9}  {'HLO chars':>10}  "
          f"{'temp MiB':>9}   (median of {args.repeats})")
    med = {}
    for n, rs in runs.items():
        med[n] = {k: statistics.median(r[k] for r in rs) for k in ("lower", "compile")}
        print(f"{n:6d}  {med[n]['lower']:8.2f}  {med[n]['compile']:9.2f}  {rs[0]['hlo']:10,d}  "
              f"{rs[0]['temp'] / 2**20:9.1f}")
    lo, hi = min(args.layers), max(args.layers)
    if lo != hi:
        ratio = med[hi]["compile"] / med[lo]["compile"]
        print(f"\n{hi} vs {lo} layers: compile time x{ratio:.2f}, "
              f"lowering x{med[hi]['lower'] / med[lo]['lower']:.2f}, HLO size "
              f"x{runs[hi][0]['hlo'] / runs[lo][0]['hlo']:.3f}")


if __name__ == "__main__":
    main()
