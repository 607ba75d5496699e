"""Held-out answer accuracy and speed of the sampler settings on a trained demo model.

    lladav-train --config configs/demo.py --workdir /tmp/lladav-demo
    python benchmarks/sampler_accuracy.py --ckpt /tmp/lladav-demo

Generates an answer for every held-out synthetic question (the `test` split, never trained on)
with each sampler setting, scores exact match against the drawn answer, and times the batches
(compilation apart). The question: does the fast path (dual cache + threshold 0.9) answer as
well as the plain sampler? Answers are one word, so 4 positions in one block, 4 steps.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.synthetic import SyntheticSource, chance_accuracy
from lladav_jax.inference import api
from lladav_jax.inference.scoring import exact_match

SETTINGS = {
    "none": dict(cache="none"),
    "prefix": dict(cache="prefix"),
    "dual": dict(cache="dual"),
    "dual+0.9": dict(cache="dual", threshold=0.9),
}


def score(model: api.Model, rows: list[dict], options: dict, batch_size: int) -> dict:
    """Accuracy (overall and per question type), seconds and denoising steps for one setting."""
    items = [(r["images"][0], r["conversations"][0]["value"].replace("<image>\n", ""))
             for r in rows]
    model.generate_batch(items[:batch_size], **options)  # compile outside the clock
    right, seen, steps, seconds = collections.Counter(), collections.Counter(), 0, 0.0
    for k in range(0, len(items), batch_size):
        chunk = items[k : k + batch_size]
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        start = time.perf_counter()
        out = model.generate_batch(chunk, return_details=True, **options)
        seconds += time.perf_counter() - start
        steps += out[0].steps
        for row, g in zip(rows[k : k + batch_size], out, strict=False):
            seen[row["question_type"]] += 1
            right[row["question_type"]] += exact_match(g.text, row["answer"])
    n = sum(seen.values())
    return {"accuracy": sum(right.values()) / n, "count": n, "seconds": seconds,
            "steps": steps, "per_type": {q: right[q] / seen[q] for q in sorted(seen)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a trained demo workdir or model directory")
    p.add_argument("--count", type=int, default=512, help="held-out questions")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--gen_length", type=int, default=4)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    model = api.load(args.ckpt)
    run = modeldir.run_config(modeldir.resolve(args.ckpt).tokenizer_dir)
    seed = run.get("data", {}).get("seed", 0)  # the held-out split of the run's data seed
    source = SyntheticSource(args.count, split="test", seed=seed)
    rows = [source[i] for i in range(len(source))]
    chance = sum(chance_accuracy(r["question_type"]) for r in rows) / len(rows)
    g = args.gen_length
    results = {}
    print(f"{len(rows)} held-out questions, chance {chance:.3f}, gen_length {g} in one block")
    for name in args.settings.split(","):
        options = dict(gen_length=g, block_length=g, steps=g, **SETTINGS[name])
        r = results[name] = score(model, rows, options, args.batch_size)
        per_type = " ".join(f"{q} {a:.3f}" for q, a in r["per_type"].items())
        print(f"{name:>9}: accuracy {r['accuracy']:.3f} ({per_type}); {r['seconds']:.2f} s, "
              f"{r['steps']} denoising steps over {-(-len(rows) // args.batch_size)} batches")
    if "none" in results:
        base = results["none"]
        for name, r in results.items():
            print(f"{name:>9}: {100 * (r['accuracy'] - base['accuracy']):+.1f} points, "
                  f"{base['seconds'] / r['seconds']:.2f}x the speed of no cache")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"chance": chance, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
