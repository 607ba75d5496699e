"""Scoring answers as `lladav-eval` does (docs/design.md §10.3): benchmark presets, reading rows,
extracting option letters, exact match and relaxed accuracy.

Rows: `image` (a path, a list of paths, or absent; `images` is another name for it) or
`video` (a path), `question`, `answer` (a string, or a list of accepted strings) and optional
`choices` (a list). Paths are read from the data file's folder; one that leaves it, by `..` or as
an absolute path elsewhere, is an error. A multiple-choice question gets its choices appended as
"A. ...\\nB. ..." (choices already lettered so, as VideoMME's are, are not lettered twice) and is
scored by the letter read from the prediction. Other questions are scored by exact match
(ignoring case, whitespace and punctuation) or, with the `chartqa` preset or --metric relaxed,
by relaxed accuracy (numbers within 5%, else exact match).

Presets (`PRESETS`, docs/design.md §5.4): the paper's sampler settings per benchmark, and for
some how the question is put and the video read. `videomme`: multiple choice (gen_length,
block_length and steps 2) on videos read as `video.max_frames` frames spread evenly
(`uniform_frames`), asked in VideoMME's words (`prompt`: "Select the best answer to the following
multiple-choice question based on the video. Respond with only the letter (A, B, C, or D) of the
correct option.", the question, the lettered options, then the multiple-choice instruction).
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
    "videomme": dict(gen_length=2, block_length=2, steps=2, **_PAPER, prompt="videomme",
                     uniform_frames=True),
}
# Preset fields that are not sampler options: the metric for questions without choices, the
# prompt style (`prompt_of`) and whether videos are read as max_frames frames spread evenly.
NOT_SAMPLER = ("metric", "prompt", "uniform_frames")
PROMPT_STYLES = ("default", "videomme")
METRICS = ("exact", "relaxed")
LETTERS = string.ascii_uppercase
# As lmms-eval prompts LLaVA-OneVision (and LLaDA-V) for multiple choice.
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# lmms-eval's VideoMME prompt (`videomme_doc_to_text`), its letters following the choices.
VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based "
                        "on the video. Respond with only the letter ({letters}) of the correct "
                        "option.")


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


def word_accuracy(prediction: str, answer: str | list[str]) -> float:
    """Partial credit for a long answer: the words (normalised) equal to the answer's at the
    same place, over the longer of the two (an extra or missing word counts against it); the
    best over a list of answers. 1.0 exactly when `exact_match` holds."""
    said = normalize(prediction).split()
    best = 0.0
    for a in _accepted(answer):
        want = normalize(a).split()
        longer = max(len(said), len(want))
        right = sum(p == w for p, w in zip(said, want))
        best = max(best, right / longer if longer else 1.0)
    return best


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


def _unlettered(choice, index: int) -> str:
    """A choice without a leading "A. " ("A:", "A)", "(A)") naming its own position."""
    letter = LETTERS[index]
    m = re.match(rf"\s*(?:\({letter}\)|{letter}[.:)])\s+(?=\S)", str(choice))
    return str(choice)[m.end():] if m else str(choice)


def lettered(choices: Sequence[str]) -> str:
    """The options as "A. ...\\nB. ...", a choice already lettered by its position once."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(plain_choices(choices)))


def plain_choices(choices: Sequence[str]) -> list[str]:
    """The choices, each without a leading letter that names its position ("A. red": "red")."""
    return [_unlettered(c, i) for i, c in enumerate(choices)]


def format_choices(question: str, choices: Sequence[str]) -> str:
    return f"{question}\n{lettered(choices)}\n{MC_INSTRUCTION}"


def letter_list(n: int) -> str:
    """The first n letters as a sentence says them: "A or B", "A, B, C, or D"."""
    letters = list(LETTERS[:n])
    return " or ".join(letters) if n <= 2 else f"{', '.join(letters[:-1])}, or {letters[-1]}"


def format_videomme(question: str, choices: Sequence[str]) -> str:
    """VideoMME's prompt: its instruction, the question, the options, MC_INSTRUCTION."""
    head = VIDEOMME_INSTRUCTION.format(letters=letter_list(len(choices)))
    return f"{head}\n{question}\n{lettered(choices)}\n{MC_INSTRUCTION}"


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
def _file_inside(folder: pathlib.Path, name: str, where: str, what: str) -> pathlib.Path:
    inside = path_inside(folder, name)
    if inside is None:  # refused before anything is opened, like the training data
        raise ValueError(f"{where}: {what} {name!r} leaves the data file's folder {folder}")
    if not os.path.isfile(inside):
        raise ValueError(f"{where}: {what} {inside}: no such file")
    return pathlib.Path(inside)


def read_rows(path: str | pathlib.Path) -> list[dict]:
    """The rows of a JSONL file, checked up front (an error names the file, line and key);
    each gets `_images` (absolute paths), `_video` (an absolute path or None) and `_line`."""
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
        given = [k for k in ("image", "images", "video") if row.get(k) is not None]
        if len(given) > 1:
            raise ValueError(f"{where}: a row gives {' and '.join(map(repr, given))}: "
                             "one of them at most")
        key = given[0] if given else "image"
        images = row.get(key)
        images = [] if images is None else images if isinstance(images, list) else [images]
        if key == "video" and not (isinstance(row[key], str) and row[key]):
            raise ValueError(f"{where}: 'video' must be a path")
        files = []
        for image in images:
            if not isinstance(image, str) or not image:
                raise ValueError(f"{where}: {key!r} must be a path or a list of paths")
            files.append(_file_inside(folder, image, where, key.rstrip("s")))
        row["_images"], row["_video"] = ([], files[0]) if key == "video" else (files, None)
        choices = row.get("choices")
        if choices is not None:
            if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
                raise ValueError(f"{where}: 'choices' must be a list of 2-{len(LETTERS)} options")
            try:
                answer_letter(row["answer"], plain_choices(choices))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
        row["_line"] = n
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def prompt_of(row: dict, style: str = "default") -> str:
    """The question put to the model: `style` "default" (the question, then any choices and
    MC_INSTRUCTION) or "videomme" (`format_videomme`; a question without choices as is)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r}: expected one of {list(PROMPT_STYLES)}")
    choices = row.get("choices")
    if not choices:
        return str(row["question"])
    fmt = format_videomme if style == "videomme" else format_choices
    return fmt(row["question"], choices)


def score(row: dict, prediction: str, metric: str) -> dict:
    """The fields added to an output row: prediction, metric, correct (and letter for MC)."""
    choices = row.get("choices")
    if choices:
        choices = plain_choices(choices)
        letter = extract_letter(prediction, choices)
        right = letter == answer_letter(row["answer"], choices)
        return {"prediction": prediction, "letter": letter, "metric": "multiple_choice",
                "correct": right}
    match = relaxed_match if metric == "relaxed" else exact_match
    return {"prediction": prediction, "metric": metric,
            "correct": bool(match(prediction, row["answer"]))}
