"""The end-of-training report on held-out samples: the synthetic test split, or `data.eval_path`.

Two scores, because they answer different questions:
- masked-answer accuracy: every answer token masked, one forward pass, right only if all its
  tokens are the argmax. It is told the answer's length, so it cannot see a model that does
  not know where its answers end.
- generation accuracy: the real sampler (`inference.api`), as `lladav-eval` runs it, at a few
  answer windows (gen_length = steps = block_length), the default 128 among them; exact match.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from lladav_jax.data import pipeline
from lladav_jax.data.example import Skip
from lladav_jax.data.synthetic import chance_accuracy
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.diffusion.options import SamplerOptions
from lladav_jax.inference import api
from lladav_jax.inference.scoring import exact_match
from lladav_jax.train.inputs import make_featurizer
from lladav_jax.train.validation import answer_span, eval_source

# Answer windows the report decodes with: short ones, and the sampler's default.
WINDOWS = (4, 16, SamplerOptions.gen_length)


def heldout_samples(config: ml_collections.ConfigDict) -> list[dict]:
    """Up to `data.eval_size` raw held-out samples: `data.eval_path` (read as the training
    source's kind, or `data.eval_source`), else the synthetic test split."""
    source = eval_source(config, config.data.eval_size)
    return [source[i] for i in range(min(len(source), config.data.eval_size))]


def _qtype(raw: dict) -> str:
    return str(raw.get("question_type", "all"))


def _chance(seen: collections.Counter) -> dict:
    """Chance per question type, where the synthetic data knows it."""
    try:
        return {q: chance_accuracy(q) for q in seen}
    except (KeyError, ValueError):
        return {}


def masked_answer_accuracy(model: nnx.Module, config: ml_collections.ConfigDict,
                           tokenizer: Tokenizer, samples: Sequence[dict] | None = None,
                           batch_size: int = 16) -> dict:
    """Accuracy overall and per question type: every answer token masked, one pass, on
    `samples` (default: `heldout_samples(config)`)."""
    samples = heldout_samples(config) if samples is None else samples
    featurize = make_featurizer(config, tokenizer, fit_answers=False)
    items = []
    for raw in samples:
        ex = featurize(raw)
        span = None if isinstance(ex, Skip) else answer_span(ex, tokenizer)
        if span is not None:
            items.append((ex, span, _qtype(raw)))
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
    return _summary(right, seen)


def _summary(right: collections.Counter, seen: collections.Counter) -> dict:
    total = sum(seen.values())
    out = {"accuracy": sum(right.values()) / max(total, 1), "count": total,
           "per_type": {q: right[q] / seen[q] for q in seen}}
    chance = _chance(seen)
    if chance:
        out["chance"] = sum(chance[q] * seen[q] for q in seen) / max(total, 1)
        out["chance_per_type"] = chance
    return out


def generation_accuracy(model: nnx.Module, config: ml_collections.ConfigDict,
                        tokenizer: Tokenizer, samples: Sequence[dict],
                        windows: Sequence[int] = WINDOWS, batch_size: int = 64,
                        **options) -> dict:
    """{window: accuracy summary}: each sample's last question (with the turns before it and
    its images) answered by the sampler with gen_length = steps = block_length = window and the
    trained model's defaults (`api.sampler_defaults`); exact match with its last answer."""
    m = api.Model(model, config.model, tokenizer, config.data.system_prompt,
                  api.sampler_defaults(config.data))
    rows = []
    for raw in samples:
        turns = list(raw.get("conversations", []))
        if raw.get("_error") or len(turns) < 2 or turns[-1].get("from") != "gpt":
            continue
        rows.append((list(raw.get("images", [])), turns[:-1], turns[-1]["value"], _qtype(raw)))
    out = {}
    for window in windows:
        right, seen = collections.Counter(), collections.Counter()
        for k in range(0, len(rows), batch_size):
            chunk = rows[k : k + batch_size]
            items = [(images or None, prompt) for images, prompt, _, _ in chunk]
            items += [items[-1]] * (batch_size - len(items))  # one compiled shape
            answers = m.generate_batch(items, gen_length=window, steps=window,
                                       block_length=window, **options)
            for (_, _, answer, qtype), predicted in zip(chunk, answers, strict=False):
                seen[qtype] += 1
                right[qtype] += exact_match(predicted, answer)
        out[window] = _summary(right, seen)
    return out


def report(model: nnx.Module, config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict:
    """Both scores on the held-out samples, printed; the masked-answer one at the top level
    (`accuracy`, `per_type`, ...), generation under `generation` {window: summary}."""
    samples = heldout_samples(config)
    result = masked_answer_accuracy(model, config, tokenizer, samples)
    chance = f" (chance {result['chance']:.3f})" if "chance" in result else ""
    print(f"held-out masked-answer accuracy {result['accuracy']:.3f} on {result['count']} "
          f"samples{chance}")
    windows = tuple(config.eval.get("report_windows", WINDOWS))
    generation = generation_accuracy(model, config, tokenizer, samples, windows)
    for window, r in generation.items():
        print(f"held-out generation accuracy, gen_length = steps = block_length = {window}: "
              f"{r['accuracy']:.3f}")
    result["generation"] = {str(w): r for w, r in generation.items()}
    return result
