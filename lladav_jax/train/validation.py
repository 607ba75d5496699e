"""Validation during training: `--config.eval.every=N` scores a held-out set every N steps.

    lladav-train --config configs/demo.py --workdir /tmp/d --config.eval.every=100

Two figures, deterministic for given parameters (the masks are a function of the seed, the
batch and t, never of the step or the process count):
- `eval_loss`: the masked-diffusion loss (docs/design.md §4.1) at each t of `eval.t_grid`
  (every target position masked with probability t, weighted 1 / t), averaged over the grid:
  a midpoint rule for the integral over t that the training loss samples at random;
  `eval_loss_t{t}` per grid point.
- `eval_accuracy`: masked-answer accuracy where the answers are short. The answer of a sample
  is the text of its last assistant turn (or, without turns, its last target span); with at
  most `eval.max_answer_tokens` tokens, all of them are masked and the answer counts as right
  only if every token is the argmax of one forward pass. `eval_answers` says how many.

The held-out set is `data.eval_path` (read as `data.eval_source`, by default the training
source's kind), or the synthetic test split for synthetic runs; its first `eval.samples`
samples, in batches of the training micro-batch rows at `data.seq_len`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lladav_jax.data import pipeline
from lladav_jax.data.example import Example, Skip
from lladav_jax.data.synthetic import SyntheticSource
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.diffusion import objective
from lladav_jax.scale import sharding
from lladav_jax.train.inputs import make_featurizer, one_source
from lladav_jax.train.state import global_batch, local_rows
from lladav_jax.train.step import MODEL_KEYS

PASS_KEYS = ("noisy", "masked", "p_mask")  # one scoring pass: `_score`'s last arguments


def eval_source(config: ml_collections.ConfigDict, size: int | None = None) -> Any:
    """The held-out source: `data.eval_path`, or the synthetic test split of `size` samples
    (default `eval.samples`; the end-of-training report asks for `data.eval_size`)."""
    d = config.data
    size = config.eval.samples if size is None else size
    if d.eval_path:
        kind = d.eval_source or ("llava_json" if d.source == "mixture" else d.source)
        spec = {"path": d.eval_path, "image_folder": d.image_folder,
                "video_folder": d.get("video_folder", ""), "split": d.eval_split,
                "size": size}
        return one_source(kind, spec, d.seed)
    if d.source == "synthetic":
        return SyntheticSource(size, split="test", seed=d.seed,
                               kind=d.get("synthetic_kind", "qa"))
    raise ValueError(f"eval.every={config.eval.every} needs a held-out set: "
                     f"--config.data.eval_path=... (data.source is {d.source!r})")


def answer_span(example: Example, tokenizer: Tokenizer) -> tuple[int, int] | None:
    """[start, end) of the answer: the last assistant turn's text, between its header (and the
    blank line after it) and its <|eot_id|> (and any EOS padding); the last run of targets
    where there are no turns.
    None if empty."""
    targets, tokens = example.targets, example.tokens
    ends = np.flatnonzero(targets)
    if not ends.size:
        return None
    end = int(ends[-1]) + 1
    while end > 0 and tokens[end - 1] == tokenizer.eos_id:  # EOS padding (data.answer_window)
        end -= 1
    if tokens[end - 1] == tokenizer.eot_id:
        end -= 1
    headers = np.flatnonzero(tokens[:end] == tokenizer.end_header_id)
    if headers.size:
        start = int(headers[-1]) + 1
    else:
        gaps = np.flatnonzero(~targets[:end])
        start = int(gaps[-1]) + 1 if gaps.size else 0
    while start < end and not tokenizer.decode([int(tokens[start])]).strip():
        start += 1  # the header's blank line, when it is a token of its own
    return (start, end) if end > start else None


@dataclasses.dataclass
class Validation:
    """The held-out set as this process's rows of fixed global batches, with their masks."""

    batches: list[dict]  # global arrays: the batch, then noisy tokens / masked / p_mask per pass
    t_grid: tuple[float, ...]
    answers: int  # samples scored for accuracy
    skipped: dict[str, int]  # held-out samples the featurizer skipped, by reason
    score: Any  # the compiled scoring function

    def __call__(self, graphdef: nnx.GraphDef, trainable: nnx.State,
                 frozen: nnx.State) -> dict[str, float]:
        """The row's validation values for these parameters."""
        sums = np.zeros((len(self.t_grid) + 1, 2))
        for b in self.batches:
            for k, noisy in enumerate(b["passes"]):
                answer_pass = k == len(self.t_grid)
                sums[k] += np.asarray(jax.device_get(self.score(
                    graphdef, answer_pass, trainable, frozen, b["batch"], *noisy)))
        losses = sums[:-1, 0] / np.maximum(sums[:-1, 1], 1)
        out = {"eval_loss": float(losses.mean())}
        out.update({f"eval_loss_t{t:g}": float(v) for t, v in zip(self.t_grid, losses)})
        if self.answers:
            out["eval_accuracy"] = float(sums[-1, 0] / self.answers)
            out["eval_answers"] = self.answers
        return out


def _score(graphdef: nnx.GraphDef, answer_pass: bool, trainable: nnx.State, frozen: nnx.State,
           batch: dict, noisy: jax.Array, masked: jax.Array, p_mask: jax.Array) -> jax.Array:
    """[loss sum, sample count] of a loss pass; [right answers, 0] of the answer pass (which
    masks the answers only)."""
    b = {k: v[0] for k, v in batch.items()}  # [1, rows, ...] -> [rows, ...]
    noisy, masked, p_mask = noisy[0], masked[0], p_mask[0]
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(**{**{k: b[k] for k in MODEL_KEYS if k in b}, "tokens": noisy})
    total, count = objective.loss_terms(logits, b["tokens"], masked, p_mask, b["targets"],
                                        b["segment_ids"])
    hit = (logits.argmax(-1) == b["tokens"]) | ~masked
    right = jnp.sum(hit.all(-1) & masked.any(-1)).astype(jnp.float32)
    return jnp.stack([right, 0.0]) if answer_pass else jnp.stack([total, count])


def make_validation(config: ml_collections.ConfigDict, tokenizer: Tokenizer, mesh: Mesh,
                    rules: sharding.Rules) -> Validation | None:
    """The held-out batches on `mesh` (None if `eval.every` is 0)."""
    e = config.eval
    if not e.every:
        return None
    if e.every < 0 or e.samples <= 0 or not e.t_grid or not all(0 < t <= 1 for t in e.t_grid):
        raise ValueError(f"eval: every {e.every} must be >= 0, samples {e.samples} > 0, "
                         f"t_grid {tuple(e.t_grid)} values in (0, 1]")
    source, featurize = eval_source(config), make_featurizer(config, tokenizer, fit_answers=False)
    examples, spans, skipped = [], [], collections.Counter()
    for i in range(min(len(source), e.samples)):
        ex = featurize(source[i])
        if isinstance(ex, Skip):
            skipped[ex.reason] += 1
            continue
        span = answer_span(ex, tokenizer)
        examples.append(ex)
        spans.append(span if span and span[1] - span[0] <= e.max_answer_tokens else None)
    if not examples:
        raise ValueError(f"no held-out sample could be read ({dict(skipped)})")
    rows = config.data.batch_size // config.train.grad_accum  # the training micro-batch
    mine = local_rows(mesh, 1, rows, rules)
    batches = []
    for b in range(math.ceil(len(examples) / rows)):
        chunk = examples[b * rows : (b + 1) * rows]
        batch = pipeline.collate([pipeline.Row((ex,)) for ex in chunk], rows,
                                 config.data.seq_len, config.model, tokenizer.pad_id)
        passes = [_loss_pass(batch, tokenizer.mask_id, t, (e.seed, b, k))
                  for k, t in enumerate(e.t_grid)]
        passes.append(_answer_pass(batch, spans[b * rows : (b + 1) * rows], tokenizer.mask_id))
        batches.append({"batch": _place(batch, mine, mesh, rows, rules),
                        "passes": [tuple(_place(p, mine, mesh, rows, rules)[k] for k in PASS_KEYS)
                                   for p in passes]})
    return Validation(batches, tuple(float(t) for t in e.t_grid),
                      answers=sum(s is not None for s in spans), skipped=dict(skipped),
                      score=jax.jit(_score, static_argnums=(0, 1)))


def _loss_pass(batch: dict, mask_id: int, t: float, seed: tuple[int, ...]) -> dict:
    masked = batch["targets"] & (np.random.default_rng(seed).random(batch["tokens"].shape) < t)
    return {"noisy": np.where(masked, mask_id, batch["tokens"]), "masked": masked,
            "p_mask": np.full(masked.shape, t, np.float32)}


def _answer_pass(batch: dict, spans: list, mask_id: int) -> dict:
    masked = np.zeros_like(batch["targets"])
    for r, span in enumerate(spans):
        if span is not None:
            masked[r, span[0] : span[1]] = True
    return {"noisy": np.where(masked, mask_id, batch["tokens"]), "masked": masked,
            "p_mask": np.ones(masked.shape, np.float32)}


def _place(arrays: dict, mine: list[int] | None, mesh: Mesh, rows: int,
           rules: sharding.Rules) -> dict:
    """This process's rows as global [1, rows, ...] arrays."""
    local = {k: v if mine is None else v[np.asarray(mine)] for k, v in arrays.items()}
    return global_batch(local, mesh, 1, rows, rules)
