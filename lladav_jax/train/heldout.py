"""Held-out masked-answer accuracy on the synthetic data set: every answer token masked, one
forward pass, and an answer counts as right only if all its tokens are the argmax."""

from __future__ import annotations

import collections

import jax
import ml_collections
import numpy as np
from flax import nnx

from lladav_jax.data import pipeline
from lladav_jax.data.example import Skip
from lladav_jax.data.synthetic import SyntheticSource, chance_accuracy
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.train.inputs import make_featurizer
from lladav_jax.train.validation import answer_span


def masked_answer_accuracy(model: nnx.Module, config: ml_collections.ConfigDict,
                           tokenizer: Tokenizer, batch_size: int = 16) -> dict:
    """Accuracy overall and per question type on `config.data.eval_size` held-out samples."""
    source = SyntheticSource(config.data.eval_size, split="test", seed=config.data.seed,
                             kind=config.data.get("synthetic_kind", "qa"))
    featurize = make_featurizer(config, tokenizer)
    items = []
    for i in range(len(source)):
        raw = source[i]
        ex = featurize(raw)
        span = None if isinstance(ex, Skip) else answer_span(ex, tokenizer)
        if span is not None:
            items.append((ex, span, raw["question_type"]))
    forward = nnx.jit(lambda m, b: m(**b))
    right, seen = collections.Counter(), collections.Counter()
    for k in range(0, len(items), batch_size):
        chunk = items[k : k + batch_size]
        rows = [pipeline.Row((ex,)) for ex, _, _ in chunk]
        batch = pipeline.collate(rows, len(rows), config.data.seq_len, config.model,
                                 tokenizer.pad_id)
        answers = np.zeros_like(batch["targets"])
        for r, (_, (start, end), _) in enumerate(chunk):
            answers[r, start:end] = True
        clean = batch["tokens"].copy()
        batch["tokens"] = np.where(answers, tokenizer.mask_id, clean)
        inputs = {k: v for k, v in batch.items() if k != "targets"}
        predicted = np.asarray(jax.device_get(forward(model, inputs))).argmax(-1)
        for r, (_, (start, end), qtype) in enumerate(chunk):
            seen[qtype] += 1
            right[qtype] += bool((predicted[r, start:end] == clean[r, start:end]).all())
    total = sum(seen.values())
    per_type = {q: right[q] / seen[q] for q in seen}
    chance = sum(chance_accuracy(q) * seen[q] for q in seen) / max(total, 1)
    return {"accuracy": sum(right.values()) / max(total, 1), "count": total,
            "chance": chance, "per_type": per_type,
            "chance_per_type": {q: chance_accuracy(q) for q in seen}}
