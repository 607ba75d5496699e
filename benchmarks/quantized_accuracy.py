"""Held-out accuracy and weight bytes of the trained demo model under weight-only quantization.

    lladav-train --config configs/demo.py --workdir /tmp/lladav-demo
    python benchmarks/quantized_accuracy.py --ckpt /tmp/lladav-demo [--tiles 128,32] [--repeats 3]

Loads the model as stored (float32), as int8, and as int4 with each tile of --tiles
(`lladav_jax.load(DIR, quantize=...)`), and scores each on the same held-out questions (the
`test` split of the run's data seed, never trained on) two ways: the masked-answer accuracy of
training's final check (`train.heldout.masked_answer_accuracy`: every answer token masked, one
forward pass, right only if every token is) and the sampler's answers as
benchmarks/sampler_accuracy.py scores them (exact match; 4 positions in one block, 4 steps,
temperature 0). The legs run interleaved (float int8 int4 ... float int8 int4 ...) --repeats
times: the accuracies are deterministic (checked to repeat exactly), the sampler's seconds
(compilation apart) are given as median (min-max). The issue's bar: int8 within 1 point of
float32, int4 within 3 points.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics

import ml_collections

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.synthetic import SyntheticSource, chance_accuracy
from lladav_jax.inference import api
from lladav_jax.train import heldout


def _sampler_accuracy():
    """benchmarks/sampler_accuracy.py as a module (benchmarks/ is no package): its `score`."""
    path = pathlib.Path(__file__).with_name("sampler_accuracy.py")
    spec = importlib.util.spec_from_file_location("sampler_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def legs(tiles: list[int]) -> dict[str, dict]:
    """Leg name -> `api.load` quantization arguments."""
    out = {"float32": {}, "int8": {"quantize": "int8"}}
    for tile in tiles:
        out[f"int4/{tile}"] = {"quantize": "int4", "quantize_tile": tile}
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a trained demo workdir or model directory")
    p.add_argument("--tiles", default="128,32", help="int4 tiles (inputs per scale) to measure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--count", type=int, default=512, help="held-out questions for the sampler")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--gen_length", type=int, default=4)
    p.add_argument("--cache", default="none", help="the sampler's cache (none | prefix | dual)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    score = _sampler_accuracy().score
    paths = modeldir.resolve(args.ckpt)
    # The training run's whole config: masked_answer_accuracy featurizes as training did.
    config = ml_collections.ConfigDict(modeldir.run_config(paths.tokenizer_dir))
    seed = config.data.seed if "data" in config else 0
    source = SyntheticSource(args.count, split="test", seed=seed)
    rows = [source[i] for i in range(len(source))]
    chance = sum(chance_accuracy(r["question_type"]) for r in rows) / len(rows)
    g = args.gen_length
    options = dict(gen_length=g, block_length=g, steps=g, cache=args.cache)

    models = {name: api.load(args.ckpt, **kw)
              for name, kw in legs([int(t) for t in args.tiles.split(",")]).items()}
    results = {name: {"weight_bytes": api.weight_bytes(m.module), "masked": [], "sampler": [],
                      "seconds": []} for name, m in models.items()}
    for repeat in range(args.repeats):
        for name, model in models.items():  # interleaved: each repeat runs every leg once
            r = results[name]
            masked = heldout.masked_answer_accuracy(model.module, config, model.tokenizer)
            sampled = score(model, rows, options, args.batch_size)
            r["masked"].append(masked["accuracy"])
            r["sampler"].append(sampled["accuracy"])
            r["seconds"].append(sampled["seconds"])
            r["masked_count"], r["per_type"] = masked["count"], sampled["per_type"]
            print(f"repeat {repeat} {name:>8}: masked {masked['accuracy']:.4f}, sampler "
                  f"{sampled['accuracy']:.4f}, {sampled['seconds']:.2f} s", flush=True)

    base = results["float32"]
    print(f"\n{len(rows)} held-out questions for the sampler ({args.cache} cache, gen_length {g} "
          f"in one block), {base['masked_count']} for the masked score; chance {chance:.3f}")
    print("| weights | weight bytes | vs float32 | masked-answer accuracy | vs float32 | "
          "sampler accuracy | vs float32 | sampler seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for key in ("masked", "sampler"):
            if len(set(r[key])) != 1:  # deterministic by construction: say so if not
                print(f"NOTE: {name} {key} accuracy varied across repeats: {r[key]}")
        points = {k: 100 * (r[k][0] - base[k][0]) for k in ("masked", "sampler")}
        print(f"| {name} | {r['weight_bytes']:,} | {r['weight_bytes'] / base['weight_bytes']:.3f}x"
              f" | {r['masked'][0]:.4f} | {points['masked']:+.1f} points | {r['sampler'][0]:.4f} "
              f"| {points['sampler']:+.1f} points | {spread(r['seconds'])} |")
    for name, r in results.items():
        bar = 1.0 if name == "int8" else 3.0 if name.startswith("int4") else None
        if bar is not None:
            worst = min(100 * (r[k][0] - base[k][0]) for k in ("masked", "sampler"))
            verdict = "within" if worst >= -bar else "MISSES"
            print(f"{name}: worst {worst:+.1f} points, {verdict} the {bar:g}-point bar")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"chance": chance, "options": options, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
