"""lladav-eval: answer every question of a JSONL file and score the answers (DESIGN.md 5).

  lladav-eval --ckpt DIR --data FILE.jsonl --out FILE.jsonl [--preset NAME] [--batch_size N]
    [--metric exact|relaxed] [sampler flags of lladav-generate]

Rows: `image` (a path, a list of paths, or absent; relative paths are read from the data file's
folder), `question`, `answer` (a string, or a list of accepted strings) and optional `choices`
(a list). A multiple-choice question gets its choices appended as "A. ...\\nB. ..." and is scored
by the letter read from the prediction. Other questions are scored by exact match (ignoring case,
whitespace and punctuation) or, with the `chartqa` preset or --metric relaxed, by relaxed
accuracy (numbers within 5%, else exact match). Prints the accuracy; writes every row with its
prediction and whether it was right to --out, one line per row as it is answered.
(also `python -m lladav_jax.evaluate ...`)
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import string
import sys
from collections.abc import Sequence

from lladav_jax.generate import add_sampler_flags, sampler_options

# The paper's benchmark settings (DESIGN.md 3.1): temperature 0, low_confidence remasking.
_PAPER = dict(temperature=0.0, remasking="low_confidence")
PRESETS = {
    "multiple_choice": dict(gen_length=2, block_length=2, steps=2, **_PAPER),
    "chartqa": dict(gen_length=16, block_length=16, steps=16, **_PAPER, metric="relaxed"),
    "docvqa": dict(gen_length=32, block_length=32, steps=16, **_PAPER),
    "infovqa": dict(gen_length=32, block_length=32, steps=16, **_PAPER),
    "mathvista": dict(gen_length=96, block_length=96, steps=48, **_PAPER),
    "mathverse": dict(gen_length=64, block_length=64, steps=32, **_PAPER),
}
METRICS = ("exact", "relaxed")
LETTERS = string.ascii_uppercase
# As lmms-eval prompts LLaVA-OneVision (and LLaDA-V) for multiple choice.
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


# -- scoring ---------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed."""
    text = re.sub(r"[^\w\s]", " ", str(text).lower()).replace("_", " ")
    return " ".join(text.split())


def _accepted(answer) -> list[str]:
    return [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]


def exact_match(prediction: str, answer: str | list[str]) -> bool:
    """Normalised equality with the answer (or any of a list of answers)."""
    return any(normalize(prediction) == normalize(a) for a in _accepted(answer))


def _to_float(text: str) -> float | None:
    text = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, answer: str | list[str], tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy: numbers within `tolerance` of a non-zero answer (relative),
    anything else by exact match."""
    for a in _accepted(answer):
        want, got = _to_float(a), _to_float(prediction)
        if want and got is not None:  # as ChartQA: a zero answer falls back to exact match
            if abs(got - want) / abs(want) <= tolerance:
                return True
        elif normalize(prediction) == normalize(a):
            return True
    return False


def format_choices(question: str, choices: Sequence[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\n{MC_INSTRUCTION}"


def extract_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """The choice a free-form prediction names, as a letter (None if it names none or several).

    In order: a bare letter ("B", "(B)", "B."), "the answer is B", the text of one choice,
    a letter opening the answer ("B. cat", "(B) cat"), one choice's text inside the answer,
    then the only capital letter standing alone that is a choice.
    """
    letters = LETTERS[: len(choices)]
    text = prediction.strip()
    pick = lambda m: m.group(1) if m and m.group(1) in letters else None
    if got := pick(re.fullmatch(r"\(?([A-Z])\)?[.:)]?", text)):
        return got
    if got := pick(re.search(r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*\(?([A-Z])\b", text)):
        return got
    norm = normalize(text)
    same = [i for i, c in enumerate(choices) if normalize(c) == norm]
    if len(same) == 1:
        return letters[same[0]]
    if got := pick(re.match(r"\(?([A-Z])(?:\)|[.:])", text)):
        return got
    inside = [i for i, c in enumerate(choices)
              if normalize(c) and re.search(rf"\b{re.escape(normalize(c))}\b", norm)]
    if len(inside) == 1:
        return letters[inside[0]]
    alone = set(re.findall(r"\b([A-Z])\b", text)) & set(letters)
    return alone.pop() if len(alone) == 1 else None


def answer_letter(answer, choices: Sequence[str]) -> str:
    """The letter of a multiple-choice answer given as a letter, an index or a choice's text."""
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return LETTERS[answer]
    text = str(answer).strip().strip("()").rstrip(".")
    if len(text) == 1 and text in LETTERS[: len(choices)]:
        return text
    same = [i for i, c in enumerate(choices) if normalize(c) == normalize(text)]
    if len(same) == 1:
        return LETTERS[same[0]]
    raise ValueError(f"answer {answer!r} is neither a choice letter nor one choice's text")


# -- data ------------------------------------------------------------------------------------------
def read_rows(path: str | pathlib.Path) -> list[dict]:
    """The rows of a JSONL file, checked up front (an error names the file, line and key);
    each gets `_images` (absolute paths) and `_line`."""
    path = pathlib.Path(path)
    folder = path.absolute().parent
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be a JSON object")
        for key in ("question", "answer"):
            if key not in row:
                raise ValueError(f"{where}: missing key {key!r}")
        images = row.get("image")
        images = [] if images is None else images if isinstance(images, list) else [images]
        row["_images"] = [folder / i for i in images]
        for i in row["_images"]:
            if not i.is_file():
                raise ValueError(f"{where}: image {i}: no such file")
        choices = row.get("choices")
        if choices is not None:
            if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
                raise ValueError(f"{where}: 'choices' must be a list of 2-{len(LETTERS)} options")
            try:
                answer_letter(row["answer"], choices)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
        row["_line"] = n
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def prompt_of(row: dict) -> str:
    choices = row.get("choices")
    return format_choices(row["question"], choices) if choices else str(row["question"])


def score(row: dict, prediction: str, metric: str) -> dict:
    """The fields added to an output row: prediction, metric, correct (and letter for MC)."""
    choices = row.get("choices")
    if choices:
        letter = extract_letter(prediction, choices)
        right = letter == answer_letter(row["answer"], choices)
        return {"prediction": prediction, "letter": letter, "metric": "multiple_choice",
                "correct": right}
    match = relaxed_match if metric == "relaxed" else exact_match
    return {"prediction": prediction, "metric": metric,
            "correct": bool(match(prediction, row["answer"]))}


# -- command ---------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lladav-eval", description=__doc__.split("\n\n")[0])
    add_sampler_flags(p)
    p.add_argument("--data", required=True, help="JSONL rows: image, question, answer[, choices]")
    p.add_argument("--out", required=True, help="JSONL: every row with its prediction")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a benchmark's sampler settings from the paper (flags override)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--metric", choices=METRICS,
                   help="for questions without choices (default: exact; chartqa: relaxed)")
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
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch_size must be at least 1")
    rows = read_rows(args.data)  # bad data fails before the model is loaded
    preset = dict(PRESETS.get(args.preset, {}))
    metric = args.metric or preset.pop("metric", "exact")
    preset.pop("metric", None)
    options = sampler_options(args, preset)

    from tqdm import tqdm

    from lladav_jax import api

    model = api.load(args.ckpt)
    size = min(args.batch_size, len(rows))
    results = []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f, tqdm(total=len(rows), unit="q") as bar:
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            # The last batch is filled up with repeats: one compiled shape for the whole run.
            items = [(r["_images"], prompt_of(r)) for r in chunk]
            items += [items[-1]] * (size - len(chunk))
            try:
                predictions = model.generate_batch(items, seed=args.seed, system=args.system,
                                                   **options)
            except ValueError as e:  # e.g. an image that does not decode
                lines = ", ".join(str(r["_line"]) for r in chunk)
                raise SystemExit(f"{args.data} (lines {lines}): {e}") from e
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
