"""The training config checked before any work: `check_config(config)` raises a ConfigError that
names the key, its value and the allowed range, so that a bad setting fails in the first second,
not after minutes of loading data or compiling (`train()` calls it first).

Settings checked further down, where what they are checked against is known: the batch against
the mesh (`state.check_batch`), the model's shapes (`models.config`), a data path's existence
(the sources).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any

from lladav_jax.data.featurize import OVERLONG
from lladav_jax.data.synthetic import KINDS
from lladav_jax.data.template import TEMPLATES


class ConfigError(ValueError):
    """A training setting out of its range, or settings that contradict each other."""


def _get(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"must be an integer >= {low}"


def _real(test: Callable[[float], bool], rule: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_real(v) and test(v)), f"must be a number {rule}"


# key -> (test, allowed range); each message: "KEY=VALUE: RANGE (what the key means)".
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "train.steps": (_int_at_least(0)[0], "must be an integer >= 0 (0: data.num_epochs passes "
                    "over the data)"),
    "train.grad_accum": _int_at_least(1),
    "train.log_every": _int_at_least(1),
    "train.checkpoint_every": _int_at_least(1),
    "train.keep_checkpoints": _int_at_least(1),
    "train.preemption_check_every": (_int_at_least(0)[0], "must be an integer >= 0 (0: at "
                                     "logging steps only)"),
    "train.peak_tflops_per_device": _real(lambda v: v >= 0, ">= 0 (0: known chips by name)"),
    "train.head_chunk": (_int_at_least(0)[0], "must be an integer >= 0 (0: the head at every "
                         "position)"),
    "train.on_bad_checkpoint": ((lambda v: v in ("fallback", "fail")),
                                "must be fallback or fail"),
    "data.batch_size": _int_at_least(1),
    "data.seq_len": _int_at_least(1),
    "data.num_epochs": _int_at_least(1),
    "data.window": _int_at_least(1),
    "data.num_workers": _int_at_least(0),
    "data.max_skip_fraction": _real(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.min_seen_for_abort": _int_at_least(0),
    "data.overlong": ((lambda v: v in OVERLONG), f"must be one of {', '.join(OVERLONG)}"),
    "data.template": ((lambda v: v in TEMPLATES), f"must be one of {', '.join(TEMPLATES)}"),
    "data.synthetic_kind": ((lambda v: v in KINDS), f"must be one of {', '.join(KINDS)}"),
    "optim.warmup_ratio": _real(lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.clip_norm": _real(lambda v: v >= 0, ">= 0"),
    "optim.b1": _real(lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.b2": _real(lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.eps": _real(lambda v: v > 0, "> 0"),
    "optim.weight_decay": _real(lambda v: v >= 0, ">= 0"),
    "eval.every": (_int_at_least(0)[0], "must be an integer >= 0 (0: no validation)"),
    "eval.samples": _int_at_least(1),
    "eval.max_answer_tokens": _int_at_least(0),
    "data.answer_window": (_int_at_least(0)[0], "must be an integer >= 0 (0: no EOS padding)"),
    "eval.report_windows": ((lambda v: all(_int_at_least(1)[0](w) for w in v)),
                            "must be answer windows (integers >= 1), or () for none"),
}


def _fail(key: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {rule}")


def guess_source(path: str) -> str | None:
    """The data source a path looks like: llava_json for a .json/.jsonl file, array_record for
    shards or a glob of them, tfds for a TFDS directory; None if it looks like none."""
    p = str(path).rstrip("/")
    if p.endswith((".json", ".jsonl")):
        return "llava_json"
    if any(c in p for c in "*?[") or ".array_record" in p:
        return "array_record"
    if "://" in p or not os.path.isdir(p):  # a bucket is not listed just to guess
        return None
    for root, _, files in os.walk(p):
        if "dataset_info.json" in files:
            return "tfds"
        if any(".array_record" in f for f in files):
            return "array_record"
        if root.count(os.sep) - p.count(os.sep) >= 3:  # TFDS: NAME/CONFIG/VERSION at most
            break
    return None


def _check_synthetic_paths(data: Mapping) -> None:
    # The synthetic source draws its samples and reads no file: a path given with it means
    # the user meant another source. We do not infer one: a run that silently trains on
    # other data than its config says is worse than this error.
    if data["source"] != "synthetic":
        return
    for key in ("path", "image_folder", "video_folder"):
        value = data.get(key, "")
        if value:
            guess = guess_source(data["path"]) if data["path"] else "llava_json"
            hint = (f"set --config.data.source={guess}" if guess else
                    "set --config.data.source to llava_json, array_record or tfds")
            raise ConfigError(
                f"data.{key}={value!r} is set but data.source='synthetic' draws its own "
                f"samples and reads no files: {hint}, or leave data.{key} empty for the "
                "synthetic data set (the source is not guessed from the path)")


def check_config(config: Any) -> None:
    """Raises a ConfigError naming the first training setting out of its range (`RULES`), a
    data.window smaller than data.batch_size, learning rates below 0, eval.t_grid values
    outside (0, 1], or data.path / data.image_folder given with data.source='synthetic' (which
    ignores them: the error names the source the path looks like; the source is never
    inferred silently, since a run that trains on other data than its config says is worse
    than an error)."""
    for key, (test, rule) in RULES.items():
        value = _get(config, key)
        if not test(value):
            raise _fail(key, value, rule)
    data = config["data"]
    if data["window"] < data["batch_size"]:
        raise _fail("data.window", data["window"],
                    f"must be >= data.batch_size={data['batch_size']} (a window is planned "
                    "into whole batches: a smaller one leaves every batch part padding)")
    lr = config["optim"]["lr"]
    for part, value in (lr.items() if hasattr(lr, "items") else [("", lr)]):
        if not _is_real(value) or value < 0:
            raise _fail(f"optim.lr.{part}".rstrip("."), value,
                        "must be a number >= 0 (0 freezes the part)")
    t_grid = config["eval"]["t_grid"]
    if not t_grid or not all(_is_real(t) and 0 < t <= 1 for t in t_grid):
        raise _fail("eval.t_grid", t_grid, "must be masking rates in (0, 1], at least one")
    _check_synthetic_paths(data)
    _check_adapters(config)


def _check_adapters(config: Any) -> None:
    """LoRA and quantization settings the model can take (ranks, targets, tile widths), and
    quantized weights only under LoRA: they cannot be trained themselves."""
    from lladav_jax.models import lladav  # the model is only built abstractly, no memory
    from lladav_jax.models.config import ModelConfig

    try:
        cfg = ModelConfig.from_config(config["model"])
        lladav.abstract(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.quantize.weights != "none" and cfg.lora.rank == 0:
        raise _fail("quantize.weights", cfg.quantize.weights,
                    "quantized weights are frozen: train them through adapters (QLoRA: "
                    "lora.rank > 0) or set quantize.weights=none")
    if cfg.lora.rank and not (cfg.lora.targets or cfg.lora.vision_targets):
        raise _fail("lora.targets", "", "LoRA needs at least one target layer")
