"""lladav-eval: answer every question of a JSONL file and score the answers.

  lladav-eval --ckpt DIR --data FILE.jsonl --out FILE.jsonl [--preset NAME] [--batch_size N]
    [--metric exact|relaxed] [sampler and --quantize flags of lladav-generate]

What is scored and how: `lladav_jax.inference.scoring`. Prints the accuracy; writes every row with
its prediction and whether it was right to --out, one line per row as it is answered. A row shows
the model no image, an image (`image`), several (`image` or `images`: a list) or a video
(`video`); rows of every kind may share a batch.
(also `python -m lladav_jax.cli.eval ...`)
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
from collections.abc import Sequence

from lladav_jax.cli import errors
from lladav_jax.cli.generate import (
    add_quantize_flags,
    add_sampler_flags,
    checked_sampler_options,
    load_options,
)
from lladav_jax.inference.scoring import (
    METRICS,
    NOT_SAMPLER,
    PRESETS,
    prompt_of,
    read_rows,
    score,
)

PRESET_HELP = (
    "a benchmark's settings from the paper (flags override): multiple_choice, chartqa (relaxed "
    "accuracy), docvqa, infovqa, mathvista, mathverse; videomme: multiple choice on `video` rows, "
    "video.max_frames frames spread evenly over each video and VideoMME's prompt ('Select the "
    "best answer to the following multiple-choice question based on the video. ...')"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lladav-eval", description=__doc__.split("\n\n")[0])
    add_sampler_flags(p)
    add_quantize_flags(p)
    p.add_argument("--data", required=True,
                   help="JSONL rows: [image | images | video,] question, answer[, choices]")
    p.add_argument("--out", required=True, help="JSONL: every row with its prediction")
    p.add_argument("--preset", choices=sorted(PRESETS), help=PRESET_HELP)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--metric", choices=METRICS,
                   help="for questions without choices (default: exact; chartqa: relaxed)")
    errors.add_debug_flag(p)
    return p


def _summary(results: list[dict]) -> str:
    right = sum(r["correct"] for r in results)
    lines = [f"accuracy: {right / len(results):.4f} ({right}/{len(results)})"]
    groups = collections.defaultdict(list)
    for r in results:
        groups[("metric", r["metric"])].append(r["correct"])
        if "question_type" in r:
            groups[("question_type", str(r["question_type"]))].append(r["correct"])
    if len(groups) > 1:
        for (kind, name), ok in sorted(groups.items()):
            lines.append(f"  {kind} {name}: {sum(ok) / len(ok):.4f} ({sum(ok)}/{len(ok)})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0, 1 for an error the message names (`errors.run`)."""
    return errors.run("lladav-eval", lambda: _main(argv), argv)


def _main(argv: Sequence[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    errors.require_positive(p, args, ("batch_size",))
    preset = dict(PRESETS.get(args.preset, {}))
    metric = args.metric or preset.get("metric", "exact")
    style, uniform = preset.get("prompt", "default"), preset.get("uniform_frames", False)
    preset = {k: v for k, v in preset.items() if k not in NOT_SAMPLER}
    options = checked_sampler_options(p, args, preset)
    quantize = load_options(p, args)
    rows = read_rows(args.data)  # bad data fails before the model is loaded

    from tqdm import tqdm

    from lladav_jax.inference import api

    model = api.load(args.ckpt, **quantize)  # a tile the model cannot take fails here: no --out
    size = min(args.batch_size, len(rows))
    results = []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f, tqdm(total=len(rows), unit="q") as bar:
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            # The last batch is filled up with repeats: one compiled shape for the whole run.
            items = [(api.Video(r["_video"], uniform=uniform) if r["_video"] else r["_images"],
                      prompt_of(r, style)) for r in chunk]
            items += [items[-1]] * (size - len(chunk))
            try:
                predictions = model.generate_batch(items, seed=args.seed, system=args.system,
                                                   **options)
            except ValueError as e:  # e.g. an image or a video that does not decode
                lines = ", ".join(str(r["_line"]) for r in chunk)
                raise ValueError(f"{args.data} (lines {lines}): {e}") from e
            for row, prediction in zip(chunk, predictions, strict=False):
                public = {k: v for k, v in row.items() if not k.startswith("_")}
                result = {**public, **score(row, prediction, metric)}
                results.append(result)
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{sum(r['correct'] for r in results) / len(results):.3f}")
    print(_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
