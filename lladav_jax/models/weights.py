"""Mapping between the official Hugging Face key layout (DESIGN.md 1.5) and our parameters.

One table of `Entry` rows drives both directions, one tensor at a time, so that a converter can
stream: each row names our parameter path, the HF key (with `{i}` for per-layer tensors, which
we stack along a leading `layers` axis) and how the array is laid out (PyTorch Linear weights are
[out, in], convolutions [out, in, kh, kw]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
from flax import nnx

from lladav_jax.models.siglip import num_kept_layers

LLM_PREFIX = "model."
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
# Stored but unused by LLaDA-V: the pooling head and the norm after the last layer.
VISION_IGNORED = ("post_layernorm.", "head.")


@dataclasses.dataclass(frozen=True)
class Entry:
    ours: tuple[str, ...]  # path in the model's parameter tree
    hf: str  # HF key; "{i}" marks a per-layer tensor
    kind: str = "copy"  # copy | linear (transpose) | conv (OIHW <-> HWIO)
    layers: int = 0  # number of stacked layers when `hf` has "{i}"

    def hf_keys(self) -> list[str]:
        return [self.hf.format(i=i) for i in range(self.layers)] if self.layers else [self.hf]


def _to_ours(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    return x


def llm_entries(cfg, root: tuple[str, ...] = ("llm",)) -> list[Entry]:
    n, p = cfg.text.num_layers, LLM_PREFIX + "layers.{i}."
    rows = [
        Entry((*root, "embed", "embedding"), LLM_PREFIX + "embed_tokens.weight"),
        Entry((*root, "norm", "weight"), LLM_PREFIX + "norm.weight"),
        Entry((*root, "lm_head", "kernel"), "lm_head.weight", "linear"),
        Entry((*root, "layers", "attn_norm", "weight"), p + "input_layernorm.weight", layers=n),
        Entry((*root, "layers", "mlp_norm", "weight"), p + "post_attention_layernorm.weight",
              layers=n),
    ]
    for ours, hf in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"),
                     ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
                     ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj")):
        rows.append(Entry((*root, "layers", ours, "kernel"), p + hf + ".weight", "linear", n))
    return rows


def vision_entries(cfg, root: tuple[str, ...] = ("vision",)) -> list[Entry]:
    n = num_kept_layers(cfg.vision)
    p = VISION_PREFIX + "encoder.layers.{i}."
    rows = [
        Entry((*root, "patch_embed", "kernel"), VISION_PREFIX + "embeddings.patch_embedding.weight",
              "conv"),
        Entry((*root, "patch_embed", "bias"), VISION_PREFIX + "embeddings.patch_embedding.bias"),
        Entry((*root, "pos_embed"), VISION_PREFIX + "embeddings.position_embedding.weight"),
    ]
    for ours, hf in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"),
                     ("v", "self_attn.v_proj"), ("o", "self_attn.out_proj"),
                     ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
        rows.append(Entry((*root, "layers", ours, "kernel"), p + hf + ".weight", "linear", n))
        rows.append(Entry((*root, "layers", ours, "bias"), p + hf + ".bias", layers=n))
    for ours, hf in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
        rows.append(Entry((*root, "layers", ours, "scale"), p + hf + ".weight", layers=n))
        rows.append(Entry((*root, "layers", ours, "bias"), p + hf + ".bias", layers=n))
    return rows


def lladav_entries(cfg) -> list[Entry]:
    """Every parameter of the full LLaDA-V model, in a stable order."""
    connector = [
        Entry(("connector", "fc1", "kernel"), "model.mm_projector.0.weight", "linear"),
        Entry(("connector", "fc1", "bias"), "model.mm_projector.0.bias"),
        Entry(("connector", "fc2", "kernel"), "model.mm_projector.2.weight", "linear"),
        Entry(("connector", "fc2", "bias"), "model.mm_projector.2.bias"),
        Entry(("image_newline",), "model.image_newline"),
    ]
    return llm_entries(cfg) + vision_entries(cfg) + connector


def is_ignored_hf_key(key: str, cfg) -> bool:
    """Keys an official checkpoint may hold that LLaDA-V never uses (so never imports)."""
    if not key.startswith(VISION_PREFIX):
        return False
    rest = key[len(VISION_PREFIX):]
    if rest.startswith(VISION_IGNORED):
        return True
    if rest.startswith("encoder.layers."):
        return int(rest.split(".")[2]) >= num_kept_layers(cfg.vision)
    return False


class WeightMappingError(ValueError):
    """Missing, unexpected or mis-shaped keys; the message lists every offending key."""


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def check_hf_keys(
    entries: list[Entry], shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple],
    cfg,
) -> None:
    """Raises one WeightMappingError naming every missing, unexpected or mis-shaped HF key.

    shapes: HF key -> stored shape; expected: HF key -> shape our model needs.
    """
    wanted = {k for e in entries for k in e.hf_keys()}
    missing = sorted(wanted - set(shapes))
    unexpected = sorted(k for k in shapes if k not in wanted and not is_ignored_hf_key(k, cfg))
    bad = sorted(
        f"{k}: stored {tuple(shapes[k])}, expected {tuple(expected[k])}"
        for k in wanted & set(shapes)
        if tuple(shapes[k]) != tuple(expected[k])
    )
    problems = [(missing, "missing keys"), (unexpected, "unexpected keys"), (bad, "wrong shapes")]
    lines = [f"{what} ({len(ks)}): " + ", ".join(ks[:20]) + (" ..." if len(ks) > 20 else "")
             for ks, what in problems if ks]
    if lines:
        raise WeightMappingError("checkpoint does not match the model config:\n  "
                                 + "\n  ".join(lines))


def expected_hf_shapes(entries: list[Entry], params: Mapping) -> dict[str, tuple[int, ...]]:
    """HF key -> shape, derived from our (possibly abstract) parameter tree."""
    out = {}
    for e in entries:
        shape = tuple(_get(params, e.ours).shape)
        per_layer = shape[1:] if e.layers else shape
        if e.kind == "linear":
            per_layer = per_layer[::-1]
        elif e.kind == "conv":
            per_layer = (per_layer[3], per_layer[2], per_layer[0], per_layer[1])
        for k in e.hf_keys():
            out[k] = per_layer
    return out


def from_hf(
    state_dict: Mapping[str, np.ndarray], params: Mapping, entries: list[Entry], cfg
) -> dict:
    """HF state dict -> nested dict of numpy arrays shaped like `params` (a pure dict).

    `params` (real or abstract, e.g. from `nnx.eval_shape`) only provides shapes.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    check_hf_keys(entries, shapes, expected_hf_shapes(entries, params), cfg)
    out: dict = {}
    for e, value in iter_from_hf(entries, state_dict):
        _set(out, e.ours, value)
    return out


def iter_from_hf(entries: list[Entry], tensors: Mapping) -> Iterator[tuple[Entry, np.ndarray]]:
    """Yields (entry, our array) one parameter at a time; `tensors` may load lazily."""
    for e in entries:
        arrays = [_to_ours(e.kind, np.asarray(tensors[k])) for k in e.hf_keys()]
        yield e, (np.stack(arrays) if e.layers else arrays[0])


def to_hf(params: Mapping, entries: list[Entry]) -> dict[str, np.ndarray]:
    """Nested dict of our arrays -> HF state dict (numpy)."""
    return dict(iter_to_hf(params, entries))


def iter_to_hf(params: Mapping, entries: list[Entry]) -> Iterator[tuple[str, np.ndarray]]:
    for e in entries:
        value = np.asarray(_get(params, e.ours))
        if e.layers:
            for key, layer in zip(e.hf_keys(), value):
                yield key, np.ascontiguousarray(_to_hf(e.kind, layer))
        else:
            yield e.hf, np.ascontiguousarray(_to_hf(e.kind, value))


def load_hf(model, state_dict: Mapping[str, np.ndarray], entries: list[Entry], cfg) -> None:
    """Writes an HF state dict into an nnx model in place (checked first; nothing on error)."""
    state = nnx.state(model, nnx.Param)
    pure = from_hf(state_dict, nnx.to_pure_dict(state), entries, cfg)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def export_hf(model, entries: list[Entry]) -> dict[str, np.ndarray]:
    """An nnx model's parameters as an HF state dict (numpy)."""
    return to_hf(nnx.to_pure_dict(nnx.state(model, nnx.Param)), entries)
