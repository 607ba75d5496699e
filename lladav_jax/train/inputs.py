"""From the `data` settings to a source, a featurizer and the per-process batch iterator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import ml_collections

from lladav_jax.data import pipeline
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.featurize import Featurizer
from lladav_jax.data.synthetic import SyntheticSource
from lladav_jax.data.tokenizer import Tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.load(path) if path else load_demo_tokenizer()


def one_source(kind: str, spec: Any, seed: int) -> Any:
    """One source of `kind` from its settings (`path`, `image_folder`, `video_folder`, `split`,
    `size`)."""
    if kind == "synthetic":
        return SyntheticSource(spec.get("size", 4096), split="train", seed=seed,
                               kind=spec.get("synthetic_kind", "qa"))
    if not spec.get("path"):
        raise ValueError(f"data source {kind!r} needs a path (--config.data.path=...)")
    if kind == "llava_json":
        from lladav_jax.data.sources.llava_json import LlavaJsonSource

        return LlavaJsonSource(spec["path"], spec.get("image_folder") or None,
                               spec.get("video_folder") or None)
    if kind == "array_record":
        from lladav_jax.data.sources.array_record import ArrayRecordSource

        return ArrayRecordSource(spec["path"])
    if kind == "tfds":
        from lladav_jax.data.sources.tfds import TfdsSource

        return TfdsSource(spec["path"], spec.get("split", "train"))
    raise ValueError(f"unknown data source {kind!r}: synthetic, llava_json, array_record, "
                     "tfds or mixture")


def make_source(data: ml_collections.ConfigDict) -> Any:
    """The random-access source the `data` settings name."""
    if data.source != "mixture":
        return one_source(data.source, data, data.seed)
    from lladav_jax.data.sources.mixture import Mixture

    parts = list(data.mixture)
    if not parts:
        raise ValueError("data.source=mixture needs data.mixture: [{source, path, weight}, ...]")
    sources = [one_source(p["source"], p, data.seed) for p in parts]
    return Mixture(sources, [float(p["weight"]) for p in parts], seed=data.seed,
                   names=[p.get("name") or p.get("path") or p["source"] for p in parts])


def make_featurizer(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                    fit_answers: bool = True) -> Featurizer:
    """The run's featurizer; `fit_answers=False` leaves answers whole, unpadded (held-out
    scoring: an answer cut to its training window would be scored on a part of it)."""
    d = config.data
    return Featurizer(config.model, tokenizer, template=d.template, seq_len=d.seq_len,
                      system=d.system_prompt, overlong=d.overlong,
                      answer_window=d.get("answer_window", 0) if fit_answers else 0)


def make_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 rows: Sequence[int] | None = None) -> tuple[grain.IterDataset, int]:
    """(batch iterator, source length).

    Every process plans the same global stream of `data.batch_size`-row batches (from cheap
    measures of every sample) and featurizes only the samples of its `rows` of each batch (its
    share of the global batch; None = all). So the global batch, its length bucket and the
    number of batches never depend on the process count: two processes train exactly as one
    does, and none runs out of data before the others. A batch holds the `BATCH_KEYS` of its
    rows and, for the whole global batch, `num_samples`, `num_tokens` (non-padding) and
    `num_tiles` (real image tiles); `skips` the plan found (the same on every process) and
    `local_skips` found featurizing this process's rows (`data/pipeline.py`)."""
    d = config.data
    source = make_source(d)
    ds = pipeline.make_dataset(source, make_featurizer(config, tokenizer), config.model, d,
                               pad_id=tokenizer.pad_id, rows=rows)
    return ds, len(source)
