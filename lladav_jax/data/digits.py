"""A small real image set posed as VQA: scikit-learn's handwritten digits (1,797 scans, 8x8
pixels, 16 grey levels; it ships with the package, nothing is downloaded).

    lladav-data digits --out /tmp/lladav-digits      # needs scikit-learn (the `digits` extra)

Writes, under `out`:
- `images/NNNN.png`: every scan as an 8-bit grey PNG (ink dark on white, as written);
- `train.json`: LLaVA JSON, "What digit is this?" -> the digit's name ("seven"), 1,500 samples;
- `test.json`: the other 297 in the same format (`data.eval_path` of a training run);
- `test.jsonl`: the same 297 as `lladav-eval` rows (image, question, answer).

The answers are English words (2-4 tokens of the demo tokenizer for most digits), so the model
has to end multi-token answers on its own. The split is a fixed shuffle (seed 0).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "What digit is this?"
TRAIN_SIZE = 1500


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8], 255 = white paper; labels int [N]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise ImportError("the digits set ships with scikit-learn: pip install -e '.[digits]'"
                          ) from e
    d = sklearn_digits()
    ink = d.images.astype(np.float32) / 16.0  # 0 (paper) .. 1 (ink)
    return np.round(255 * (1 - ink)).astype(np.uint8), d.target.astype(int)


def write_digits(out: str | pathlib.Path, train_size: int = TRAIN_SIZE,
                 seed: int = 0) -> dict[str, int]:
    """The files above under `out`; returns the number of samples per split."""
    out = pathlib.Path(out)
    images, labels = load_digits()
    if not 0 < train_size < len(labels):
        raise ValueError(f"train_size must be in 1..{len(labels) - 1}, got {train_size}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    splits = {"train": order[:train_size], "test": order[train_size:]}
    samples = {}
    for split, indices in splits.items():
        samples[split] = []
        for i in indices:
            name = f"images/{i:04d}.png"
            Image.fromarray(images[i], mode="L").save(out / name)
            samples[split].append({
                "id": f"digits-{i:04d}", "image": name,
                "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                  {"from": "gpt", "value": NAMES[labels[i]]}]})
    for split, rows in samples.items():
        (out / f"{split}.json").write_text(json.dumps(rows, indent=1))
    with (out / "test.jsonl").open("w") as f:
        for s in samples["test"]:
            f.write(json.dumps({"id": s["id"], "image": s["image"], "question": QUESTION,
                                "answer": s["conversations"][1]["value"]}) + "\n")
    return {split: len(rows) for split, rows in samples.items()}
