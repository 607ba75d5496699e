"""Scoring answers as `lladav-eval` does (docs/design.md §10.3): benchmark presets, reading rows,
extracting option letters, exact match and relaxed accuracy.

Rows: `image` (a path, a list of paths, or absent; paths are read from the data file's folder,
and one that leaves it, by `..` or as an absolute path elsewhere, is an error), `question`,
`answer` (a string, or a list of accepted strings) and optional `choices` (a list). A
multiple-choice question gets its choices appended as "A. ...\\nB. ..." and is scored by the
letter read from the prediction. Other questions are scored by exact match (ignoring case,
whitespace and punctuation) or, with the `chartqa` preset or --metric relaxed, by relaxed
accuracy (numbers within 5%, else exact match).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import string
from collections.abc import Sequence

from lladav_jax.data.sources import path_inside

# The paper's benchmark settings (docs/design.md §5.4): temperature 0, low_confidence remasking.
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
        row["_images"] = []
        for image in images:
            if not isinstance(image, str) or not image:
                raise ValueError(f"{where}: 'image' must be a path or a list of paths")
            inside = path_inside(folder, image)
            if inside is None:  # refused before anything is opened, like the training data
                raise ValueError(f"{where}: image {image!r} leaves the data file's folder "
                                 f"{folder}")
            if not os.path.isfile(inside):
                raise ValueError(f"{where}: image {inside}: no such file")
            row["_images"].append(pathlib.Path(inside))
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
