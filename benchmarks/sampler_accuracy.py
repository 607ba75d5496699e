"""Held-out answer accuracy and speed of the sampler settings on a trained demo model.

    lladav-train --config configs/demo.py --workdir /tmp/lladav-demo
    python benchmarks/sampler_accuracy.py --ckpt /tmp/lladav-demo
    lladav-train --config configs/demo_describe.py --workdir /tmp/lladav-describe
    python benchmarks/sampler_accuracy.py --ckpt /tmp/lladav-describe --kind describe

Generates an answer for every held-out synthetic question (the `test` split, never trained on)
with each sampler setting, scores it against the drawn answer (exact match, and word accuracy:
`scoring.word_accuracy`), and times the batches (compilation apart). The question: do the fast
paths (caches, parallel decoding, adaptive refresh) answer as well as the plain sampler?
`qa` answers are one word: 4 positions in one block, 4 steps. `describe` answers are 7-15
tokens: 32 positions in blocks of 8, 32 steps, so the caches go stale across blocks.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.synthetic import SyntheticSource, chance_accuracy
from lladav_jax.inference import api
from lladav_jax.inference.scoring import exact_match, word_accuracy

SETTINGS = {
    "none": dict(cache="none"),
    "prefix": dict(cache="prefix"),
    "dual": dict(cache="dual"),
    "dual+0.9": dict(cache="dual", threshold=0.9),
    "adaptive": dict(cache="adaptive"),
    "adaptive+0.9": dict(cache="adaptive", threshold=0.9),
}
# The shape of the answer window per kind: gen_length, block_length, steps.
WINDOWS = {"qa": (4, 4, 4), "describe": (32, 8, 32)}


def score(model: api.Model, rows: list[dict], options: dict, batch_size: int) -> dict:
    """Accuracy (overall and per question type), seconds and denoising steps for one setting."""
    items = [(r["images"][0], r["conversations"][0]["value"].replace("<image>\n", ""))
             for r in rows]
    model.generate_batch(items[:batch_size], **options)  # compile outside the clock
    right, seen, words = collections.Counter(), collections.Counter(), 0.0
    steps, refreshes, seconds = 0, 0, 0.0
    for k in range(0, len(items), batch_size):
        chunk = items[k : k + batch_size]
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        start = time.perf_counter()
        out = model.generate_batch(chunk, return_details=True, **options)
        seconds += time.perf_counter() - start
        steps += out[0].steps
        refreshes += out[0].refreshes
        for row, g in zip(rows[k : k + batch_size], out, strict=False):
            seen[row["question_type"]] += 1
            right[row["question_type"]] += exact_match(g.text, row["answer"])
            words += word_accuracy(g.text, row["answer"])
    n = sum(seen.values())
    return {"accuracy": sum(right.values()) / n, "words": words / n, "count": n,
            "seconds": seconds, "steps": steps, "refreshes": refreshes,
            "per_type": {q: right[q] / seen[q] for q in sorted(seen)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a trained demo workdir or model directory")
    p.add_argument("--count", type=int, default=512, help="held-out questions")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--kind", choices=tuple(WINDOWS), default="qa",
                   help="the synthetic questions: one-word qa, or long describe answers")
    p.add_argument("--window", help="gen_length,block_length,steps (default: the kind's)")
    p.add_argument("--refresh_threshold", type=float,
                   help="the adaptive settings' (default: the sampler's)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    model = api.load(args.ckpt)
    run = modeldir.run_config(modeldir.resolve(args.ckpt).tokenizer_dir)
    seed = run.get("data", {}).get("seed", 0)  # the held-out split of the run's data seed
    source = SyntheticSource(args.count, split="test", seed=seed, kind=args.kind)
    rows = [source[i] for i in range(len(source))]
    g, bl, steps = (int(v) for v in args.window.split(",")) if args.window else WINDOWS[args.kind]
    chance = (sum(chance_accuracy(r["question_type"]) for r in rows) / len(rows)
              if args.kind == "qa" else None)
    results = {}
    print(f"{len(rows)} held-out {args.kind} questions, chance {chance}, gen_length {g} in "
          f"blocks of {bl}, {steps} steps")
    for name in args.settings.split(","):
        options = dict(gen_length=g, block_length=bl, steps=steps, **SETTINGS[name])
        if args.refresh_threshold is not None and options["cache"] == "adaptive":
            options["refresh_threshold"] = args.refresh_threshold
        r = results[name] = score(model, rows, options, args.batch_size)
        per_type = " ".join(f"{q} {a:.3f}" for q, a in r["per_type"].items())
        print(f"{name:>12}: exact {r['accuracy']:.3f} ({per_type}), words {r['words']:.3f}; "
              f"{r['seconds']:.2f} s, {r['steps']} denoising steps and {r['refreshes']} full "
              f"passes over {-(-len(rows) // args.batch_size)} batches")
    if "none" in results:
        base = results["none"]
        for name, r in results.items():
            print(f"{name:>12}: {100 * (r['accuracy'] - base['accuracy']):+.1f} points exact, "
                  f"{100 * (r['words'] - base['words']):+.1f} words, "
                  f"{base['seconds'] / r['seconds']:.2f}x the speed of no cache")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"chance": chance, "window": [g, bl, steps], "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
