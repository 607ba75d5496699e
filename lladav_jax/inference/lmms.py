"""LLaDA-V as an lmms-eval model: `--model lladav`, any batch size, on our compiled sampler.

  python -m lmms_eval --model lladav --model_args pretrained=WORKDIR --batch_size 8 \
      --tasks mme --gen_kwargs gen_length=2,block_length=2,gen_steps=2,think_mode=no_think

Installing this package registers the model under lmms-eval's entry-point group
`lmms_eval.models` (setup.py); lmms-eval needs nothing else. It answers `generate_until` requests
as the official adapter does (docs/design.md §5.6), in batches:
- generation settings, from the task's `generation_kwargs` and `--gen_kwargs` over the model
  arguments: `gen_length`, `block_length` and `gen_steps` (or `steps`) with the official defaults
  of 2, `remasking` (low_confidence), `cfg` (0), `temperature` (0), `think_mode` (`think` or
  `no_think`: " /think" or " /no_think" after a question that shows a visual), and ours:
  `cache`, `threshold`, `refresh_threshold`, `shrink_batch`, `allow_eos`. Other keys (HF's
  `max_new_tokens`, `top_p`, `until`, ...) mean nothing to a diffusion sampler and are
  ignored, logged once;
- `stopping_criteria` cuts an answer at the first of its strings; an answer loses one trailing
  "." and surrounding white space;
- a visual is a PIL image, or a video as a path (lmms-eval's convention), read as
  `video.max_frames` frames spread evenly, as the official evaluation reads videos;
- requests with the same settings are decoded `batch_size` at a time, the last batch filled up
  with repeats so that a task compiles one program per setting.
Model arguments: `pretrained` (a model directory or training workdir), `batch_size` (default 8),
`seed`, `system` (default: the model's), `quantize` (int8 | int4), `quantize_tile`,
`quantize_vision`, and any generation setting above as a default for every task.
Log-likelihood requests (multiple choice by likelihood) are refused: LLaDA-V is scored by
generation, as the paper does.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image

from lladav_jax.inference.lmms_task import OFFICIAL_NAMES

if TYPE_CHECKING:
    from lladav_jax.diffusion.options import SamplerOptions
    from lladav_jax.inference.media import Visual

log = logging.getLogger(__name__)

# The official adapter's settings when a task gives none (its `generate_until`).
OFFICIAL_DEFAULTS = dict(gen_length=2, block_length=2, steps=2, remasking="low_confidence",
                         cfg_scale=0.0, temperature=0.0)
# Generation keys of the official adapter and lmms-eval, by the sampler option each sets.
RENAMED = {official: ours for ours, official in OFFICIAL_NAMES.items()}
SAMPLER_KEYS = ("gen_length", "block_length", "steps", "remasking", "cfg_scale", "temperature",
                "cache", "threshold", "refresh_threshold", "shrink_batch", "allow_eos")
THINK_MODES = ("think", "no_think")
LOAD_KEYS = ("quantize", "quantize_tile", "quantize_vision")


def _setting(raw: dict[str, Any]) -> tuple[dict[str, Any], str | None, tuple[str, ...], list[str]]:
    """Split generation keys into sampler options, think mode, stop strings and ignored keys."""
    options, think, stops, ignored = {}, None, (), []
    steps = {k: raw[k] for k in ("gen_steps", "steps") if k in raw}
    if len(set(map(str, steps.values()))) > 1:
        raise ValueError(f"gen_steps and steps disagree: {steps}")
    for key, value in raw.items():
        name = RENAMED.get(key, key)
        if name in SAMPLER_KEYS:
            options[name] = None if name == "threshold" and value in ("", None, "none") else value
        elif key == "think_mode":
            if value not in (*THINK_MODES, None, ""):
                raise ValueError(f"think_mode {value!r}: expected one of {list(THINK_MODES)}")
            think = value or None
        elif key == "stopping_criteria":
            stops = (value,) if isinstance(value, str) else tuple(value or ())
        else:
            ignored.append(key)
    return options, think, stops, ignored


def clean_answer(text: str, stops: Sequence[str] = ()) -> str:
    """An answer as the official adapter returns it: cut at the first stop string, one
    trailing "." dropped, white space stripped."""
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    text = text[:-1] if text.endswith(".") else text
    return text.strip()


def _visual(visuals: Sequence[Any] | None) -> Visual:
    """lmms-eval's visuals as a prompt's: PIL images, or one video given by its path."""
    from lladav_jax.inference.media import Video

    visuals = [v for v in (visuals or []) if v is not None]
    if not visuals:
        return None
    if all(isinstance(v, Image.Image) for v in visuals):
        return visuals
    if len(visuals) == 1 and isinstance(visuals[0], str | os.PathLike):
        return Video(visuals[0], uniform=True)
    kinds = sorted({type(v).__name__ for v in visuals})
    raise ValueError(f"visuals of kinds {kinds}: expected PIL images or one video path")


class LladaV(lmms):
    """lmms-eval's model for LLaDA-V (module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 8, seed: int = 0,
                 system: str | None = None, device: str | None = None,
                 max_batch_size: int | None = None, **settings):
        super().__init__()
        del device, max_batch_size  # JAX places the model; batches are exactly batch_size
        load = {k: settings.pop(k) for k in LOAD_KEYS if k in settings}
        self.defaults, self.think, self.stops, ignored = _setting(settings)
        if ignored:
            raise TypeError(f"unknown model arguments {sorted(ignored)}")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.seed, self.system = int(seed), system
        # JAX is imported here, not at the top: lmms-eval imports this module for `manifests`.
        from lladav_jax.inference import api

        self.model = api.load(pretrained, **load)
        self._logged: set[tuple[str, ...]] = set()

    def _options(self, gen_kwargs: dict[str, Any]
                 ) -> tuple[SamplerOptions, str | None, tuple[str, ...]]:
        options, think, stops, ignored = _setting(gen_kwargs)
        if ignored and tuple(sorted(ignored)) not in self._logged:
            self._logged.add(tuple(sorted(ignored)))
            log.warning("lladav: generation keys %s mean nothing to the sampler: ignored",
                        sorted(ignored))
        checked = self.model.options(**{**OFFICIAL_DEFAULTS, **self.defaults, **options})
        return checked, think or self.think, stops or self.stops

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Each request's answer, with the answer's token count."""
        from tqdm import tqdm

        groups = collections.defaultdict(list)
        for i, request in enumerate(requests):
            groups[self._options(dict(request.args[1]))].append(i)
        answers: list[GenerationResult] = [None] * len(requests)
        with tqdm(total=len(requests), unit="q", desc="lladav") as bar:
            for (options, think, stops), indices in groups.items():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    items = [self._item(requests[i], think) for i in chunk]
                    items += [items[-1]] * (self.batch_size - len(items))
                    done = self.model.generate_batch(items, seed=self.seed, system=self.system,
                                                     return_details=True,
                                                     **dataclasses.asdict(options))
                    for i, g in zip(chunk, done, strict=False):
                        answers[i] = GenerationResult(clean_answer(g.text, stops),
                                                      TokenCounts(output_tokens=len(g.ids)))
                    bar.update(len(chunk))
        return answers

    def _item(self, request: Instance, think: str | None) -> tuple[Visual, str]:
        context, _, doc_to_visual, doc_id, task, split = request.args
        visual = _visual(doc_to_visual(self.task_dict[task][split][doc_id]))
        if visual is not None and think:
            context = f"{context} /{think}"
        return visual, context

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("lladav answers by generation (generate_until tasks); "
                                  "log-likelihood tasks are not supported")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("lladav: multi-round tasks are not supported")


def manifests():
    """lmms-eval's entry point (`lmms_eval.models`): the model's manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="lladav", simple_class_path=f"{__name__}.LladaV")]
