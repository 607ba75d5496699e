"""Does the README demo wait for its data? Wall time and data-wait share of `configs/demo.py`.

    python benchmarks/demo_input.py [--steps N] [--set KEY=VALUE ...]
    python benchmarks/demo_input.py --legs before=/tmp/before after=. --repeats 2 [--steps N]

One leg runs the trainer (`train.loop.train`) on configs/demo.py in this process, with the
batch iterator wrapped to time every `next()`: the data-wait share is the time spent in
`next()` over the loop's wall time (first `next()` to the last batch; the first batch, which
waits for the worker's start-up and first window, is reported apart). Also: the number of
waits over 0.1 s (stalls), the total wall and CPU time of `train` (compile and the held-out
score included; CPU of this process and its joined worker processes: steadier than wall time on
a shared machine), and the held-out masked-answer accuracy.

`--legs NAME=TREE[;KEY=VALUE...] ...` runs each leg in a subprocess with `PYTHONPATH=TREE` and
TREE's configs/demo.py (e.g. the code before a change: `git archive HEAD | tar -x -C
/tmp/before`) with the leg's config overrides, interleaved A B A B for `--repeats`, and prints a
table with the spread. `cached=N` among a leg's settings makes it the no-input-cost baseline:
the first N batches, made before the loop, cycled (the step's own time; the gap to it is what
the input pipeline costs the run, waiting or competing for the cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

STALL_S = 0.1


def _load_config(tree: str, steps: int, overrides: list[str]):
    spec = importlib.util.spec_from_file_location("demo", pathlib.Path(tree) / "configs/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.progress_bar = False
    if steps:
        config.train.steps = steps
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(json.loads(value)) if node[leaf] is not None else value
    return config


def _cpu_seconds() -> float:
    """CPU time of this process and its joined children (a Grain worker, once closed)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def one_leg(tree: str, steps: int, overrides: list[str], cached: int = 0) -> dict:
    """Trains the demo in this process with a timed batch iterator; returns the figures.
    cached > 0: the loop gets the pipeline's first `cached` batches over and over, made
    before the loop starts (the wall time without any input cost)."""
    import grain
    import numpy as np

    from lladav_jax.train import loop

    waits: list[tuple[float, float]] = []  # (start, seconds) of every next()

    class Timed(grain.DatasetIterator):
        def __init__(self, inner):
            super().__init__()
            self._inner = inner

        def __next__(self):
            start = time.perf_counter()
            try:
                return next(self._inner)
            finally:
                waits.append((start, time.perf_counter() - start))

        def get_state(self):
            return self._inner.get_state()

        def set_state(self, state):
            self._inner.set_state(state)

        def close(self):
            self._inner.close()

    class Cycle(grain.DatasetIterator):
        """`cached` batches made before the run, again and again: input at no cost."""

        def __init__(self, batches):
            super().__init__()
            self._batches, self._i = batches, 0

        def __next__(self):
            self._i += 1
            return dict(self._batches[(self._i - 1) % len(self._batches)])

        def get_state(self):
            return {"i": self._i}

        def set_state(self, state):
            self._i = state["i"]

    class TimedDataset:
        def __init__(self, ds):
            self._ds = ds

        def __iter__(self):
            if not cached:
                return Timed(iter(self._ds))
            it = iter(self._ds)
            batches = []
            for _ in range(cached):  # copies: out of a worker's shared memory
                batches.append({k: np.array(v) if isinstance(v, np.ndarray) else v
                                for k, v in next(it).items()})
            it.close()
            return Timed(Cycle(batches))

    make_batches = loop.make_batches
    loop.make_batches = lambda *a, **k: (lambda ds, n: (TimedDataset(ds), n))(*make_batches(*a,
                                                                                             **k))
    config = _load_config(tree, steps, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        start, cpu0 = time.perf_counter(), _cpu_seconds()
        summary = loop.train(config, workdir)
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    waits = waits[: summary["step"]]  # the loop's (a last next() may meet the end)
    first = waits[0][1]
    end = waits[-1][0] + waits[-1][1]
    loop_s = end - waits[0][0]
    after_first = end - (waits[0][0] + first)
    rest = [w for _, w in waits[1:]]
    return {
        "steps": summary["step"], "wall_s": wall, "cpu_s": cpu, "loop_s": loop_s,
        "first_batch_s": first, "wait_s": first + sum(rest),
        "wait_share": (first + sum(rest)) / loop_s,
        "wait_share_after_first": sum(rest) / after_first,
        "stalls": sum(w > STALL_S for w in rest), "stall_s": sum(w for w in rest if w > STALL_S),
        "steps_per_s_after_first": len(rest) / after_first,
        "accuracy": summary.get("accuracy"),
    }


def _table(results: dict[str, list[dict]]) -> str:
    keys = [("wall_s", "wall s", "{:.1f}"), ("cpu_s", "CPU s", "{:.0f}"),
            ("loop_s", "loop s", "{:.1f}"),
            ("first_batch_s", "first batch s", "{:.2f}"), ("wait_share", "data-wait share",
                                                          "{:.3f}"),
            ("wait_share_after_first", "... after the first batch", "{:.3f}"),
            ("stalls", "waits > 0.1 s", "{:.0f}"),
            ("steps_per_s_after_first", "steps/s", "{:.2f}"), ("accuracy", "held-out acc",
                                                                "{:.3f}")]
    lines = ["| leg | runs | " + " | ".join(k[1] for k in keys) + " |",
             "|---" * (len(keys) + 2) + "|"]
    for name, runs in results.items():
        cells = []
        for key, _, fmt in keys:
            vals = [r[key] for r in runs if r.get(key) is not None]
            if not vals:
                cells.append("-")
                continue
            med = fmt.format(statistics.median(vals))
            spread = f" ({fmt.format(min(vals))}-{fmt.format(max(vals))})" if len(vals) > 1 else ""
            cells.append(med + spread)
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=0, help="train.steps (0: the demo's 2,560)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides KEY=JSON_VALUE")
    p.add_argument("--tree", default=".", help="(one leg) where configs/demo.py is")
    p.add_argument("--legs", nargs="*", default=[],
                   help="NAME=TREE[;KEY=VALUE...]: legs in subprocesses")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", action="store_true", help="(one leg) print the result as JSON")
    p.add_argument("--cached", type=int, default=0,
                   help="(one leg) N batches made before the loop, cycled: input at no cost")
    args = p.parse_args()
    if not args.legs:
        result = one_leg(args.tree, args.steps, args.set, args.cached)
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return
    # NAME=TREE[;KEY=VALUE...]: config overrides of the leg, or cached=N (the baseline)
    legs = dict(leg.split("=", 1) for leg in args.legs)
    results: dict[str, list[dict]] = {name: [] for name in legs}
    for r in range(args.repeats):
        for name, spec in legs.items():  # interleaved: A B A B
            tree, *sets = spec.split(";")
            cached = [s.split("=", 1)[1] for s in sets if s.startswith("cached=")] or ["0"]
            sets = [s for s in sets if not s.startswith("cached=")] + args.set
            tree = os.path.abspath(tree)
            env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu"}
            cmd = [sys.executable, os.path.abspath(__file__), "--tree", tree, "--json",
                   "--steps", str(args.steps), "--cached", cached[0],
                   *(["--set", *sets] if sets else [])]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {r + 1} {name}: {results[name][-1]} (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    print(_table(results))


if __name__ == "__main__":  # Grain's worker processes re-import this module
    main()
