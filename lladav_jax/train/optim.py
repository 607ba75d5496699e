"""AdamW with a warmup + cosine schedule, global-norm clipping, and a learning rate per part.

The parts are the vision tower, the connector (with `image_newline`) and the language model.
A part with learning rate 0 is frozen: it is not differentiated and has no optimizer state
(stage 1 trains only the connector).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import ml_collections
import optax
from flax import nnx

PARTS = ("vision", "connector", "llm")


def part_of(path: tuple) -> str:
    """The part a parameter belongs to, from its path in the model."""
    top = str(path[0])
    return "connector" if top == "image_newline" else top


def trainable_filter(lrs: Mapping[str, float],
                     lora: bool = False) -> Callable[[tuple, object], bool]:
    """An nnx filter: parameters of the parts with a learning rate above 0. With `lora`, of
    the language model and the vision tower only the adapters (`nnx.LoRAParam`): their base
    weights stay frozen; the connector trains whole."""
    live = {p for p in PARTS if float(lrs.get(p, 0.0)) > 0}
    if not lora:
        return lambda path, _value: part_of(path) in live
    return lambda path, value: part_of(path) in live and (
        part_of(path) == "connector" or isinstance(value, nnx.LoRAParam))


def schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at `total_steps` (the HF/official one)."""
    warmup = round(warmup_ratio * total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0,
    )


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, dict]:
    """optim: `lr` (part -> rate), `warmup_ratio`, `clip_norm`, `b1`, `b2`, `eps`,
    `weight_decay`. Returns the transformation (over trainable parameters, labelled by part)
    and each live part's schedule (for logging)."""
    schedules = {
        p: schedule(float(optim.lr[p]), total_steps, optim.warmup_ratio)
        for p in PARTS if float(optim.lr.get(p, 0.0)) > 0
    }
    if not schedules:
        raise ValueError("every part has learning rate 0: nothing to train (config.optim.lr)")
    adamw = lambda s: optax.adamw(
        s, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
    )
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.multi_transform({p: adamw(s) for p, s in schedules.items()}, _label_tree),
    )
    return tx, schedules


def _label_tree(params):
    """Each leaf of `params` (a dict or nnx State) replaced by its part name."""
    top = lambda path: getattr(path[0], "key", getattr(path[0], "name", path[0]))
    return jax.tree_util.tree_map_with_path(lambda path, _: part_of((top(path),)), params)
