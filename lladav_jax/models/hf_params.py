"""Mapping between the official Hugging Face key layout (docs/design.md §6.1) and our parameters.

One table of `Entry` rows drives both directions, one tensor at a time, so that a converter can
stream: each row names our parameter path, the HF key (with `{i}` for per-layer tensors, which
we stack along a leading `layers` axis) and how the array is laid out (PyTorch Linear weights are
[out, in], convolutions [out, in, kh, kw]).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx, traverse_util

from lladav_jax.models.config import ModelConfig, ModelConfigLike

LLM_PREFIX = "model."
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
# Stored but unused by LLaDA-V: the pooling head and the norm after the last layer.
VISION_IGNORED = ("post_layernorm.", "head.")


# How HF lays out each kind of tensor, as the axes that bring it to ours (`np.transpose`):
# ours[axis i] = HF[axis PERMUTATIONS[kind][i]]; the inverse permutation goes back. A PyTorch
# Linear weight is [out, in] and ours [in, out]; a convolution OIHW (out, in, kh, kw) and ours
# HWIO. Everything else (embeddings, norms, biases, positions) is stored as we hold it.
PERMUTATIONS: dict[str, tuple[int, ...] | None] = {
    "copy": None,
    "linear": (1, 0),
    "conv": (2, 3, 1, 0),
}


def _perm(kind: str, ndim: int) -> tuple[int, ...]:
    p = PERMUTATIONS[kind]
    return tuple(range(ndim)) if p is None else p


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def _to_ours(kind: str, x: np.ndarray) -> np.ndarray:
    return np.transpose(x, _perm(kind, x.ndim))


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    return np.transpose(x, _inverse(_perm(kind, x.ndim)))


def _hf_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of one (unstacked) parameter of shape `ours`."""
    return tuple(ours[i] for i in _inverse(_perm(kind, len(ours))))


def _hf_row_axis(kind: str, ndim: int) -> int:
    """Our axis that HF's first axis (the rows a converter streams) becomes."""
    return _perm(kind, ndim).index(0)


@dataclasses.dataclass(frozen=True)
class Entry:
    ours: tuple[str, ...]  # path in the model's parameter tree
    hf: str  # HF key; "{i}" marks a per-layer tensor
    kind: str = "copy"  # a key of PERMUTATIONS: copy | linear | conv
    layers: int = 0  # number of stacked layers when `hf` has "{i}"

    def hf_keys(self) -> list[str]:
        return [self.hf.format(i=i) for i in range(self.layers)] if self.layers else [self.hf]


def llm_entries(cfg: ModelConfigLike, root: tuple[str, ...] = ("llm",)) -> list[Entry]:
    """LLaDA's parameters (under `root`; `()` for a bare `LLaDA`)."""
    cfg = ModelConfig.from_config(cfg)
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


def vision_entries(cfg: ModelConfigLike, root: tuple[str, ...] = ("vision",)) -> list[Entry]:
    """SigLIP's kept parameters (under `root`; `()` for a bare `SigLIPVision`)."""
    n = ModelConfig.from_config(cfg).vision.kept_layers
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


def lladav_entries(cfg: ModelConfigLike) -> list[Entry]:
    """Every parameter of the full LLaDA-V model, in a stable order."""
    cfg = ModelConfig.from_config(cfg)
    connector = [
        Entry(("connector", "fc1", "kernel"), "model.mm_projector.0.weight", "linear"),
        Entry(("connector", "fc1", "bias"), "model.mm_projector.0.bias"),
        Entry(("connector", "fc2", "kernel"), "model.mm_projector.2.weight", "linear"),
        Entry(("connector", "fc2", "bias"), "model.mm_projector.2.bias"),
        Entry(("image_newline",), "model.image_newline"),
    ]
    return llm_entries(cfg) + vision_entries(cfg) + connector


def is_ignored_hf_key(key: str, cfg: ModelConfigLike) -> bool:
    """Keys an official checkpoint may hold that LLaDA-V never uses (so never imports)."""
    if not key.startswith(VISION_PREFIX):
        return False
    rest = key[len(VISION_PREFIX):]
    if rest.startswith(VISION_IGNORED):
        return True
    if rest.startswith("encoder.layers."):
        return int(rest.split(".")[2]) >= ModelConfig.from_config(cfg).vision.kept_layers
    return False


class WeightMappingError(ValueError):
    """Missing, unexpected or mis-shaped keys; the message lists every offending key."""


def check_hf_keys(
    entries: list[Entry], shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple],
    cfg: ModelConfigLike, stored_names: Mapping[str, str] | None = None,
) -> None:
    """Raises one WeightMappingError naming every missing, unexpected or mis-shaped HF key.

    shapes: HF key -> stored shape; expected: HF key -> shape our model needs;
    stored_names: HF key -> the name it has in the files read, when they were renamed.
    """
    cfg = ModelConfig.from_config(cfg)  # once, not per key
    stored_names = stored_names or {}
    name = lambda k: f"{k} (stored as {stored_names[k]})" if k in stored_names else k
    wanted = {k for e in entries for k in e.hf_keys()}
    missing = sorted(wanted - set(shapes))
    unexpected = sorted(name(k) for k in shapes
                        if k not in wanted and not is_ignored_hf_key(k, cfg))
    bad = sorted(
        f"{name(k)}: stored {tuple(shapes[k])}, expected {tuple(expected[k])}"
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
    out, leaves = {}, traverse_util.flatten_dict(params)
    for e in entries:
        shape = tuple(leaves[e.ours].shape)
        per_layer = _hf_shape(e.kind, shape[1:] if e.layers else shape)
        for k in e.hf_keys():
            out[k] = per_layer
    return out


def from_hf(
    state_dict: Mapping[str, np.ndarray], params: Mapping, entries: list[Entry],
    cfg: ModelConfigLike,
) -> dict:
    """HF state dict -> nested dict of numpy arrays shaped like `params` (a pure dict).

    `params` (real or abstract, e.g. from `nnx.eval_shape`) only provides shapes.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    check_hf_keys(entries, shapes, expected_hf_shapes(entries, params), cfg)
    return traverse_util.unflatten_dict(
        {e.ours: value for e, value in iter_from_hf(entries, state_dict)})


def iter_from_hf(entries: list[Entry], tensors: Mapping) -> Iterator[tuple[Entry, np.ndarray]]:
    """Yields (entry, our array) one parameter at a time; `tensors` may load lazily."""
    for e in entries:
        arrays = [_to_ours(e.kind, np.asarray(tensors[k])) for k in e.hf_keys()]
        yield e, (np.stack(arrays) if e.layers else arrays[0])


def to_hf(params: Mapping, entries: list[Entry]) -> dict[str, np.ndarray]:
    """Nested dict of our arrays -> HF state dict (numpy)."""
    return dict(iter_to_hf(params, entries))


def iter_to_hf(params: Mapping, entries: list[Entry]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF key, array in HF layout) one tensor at a time."""
    leaves = traverse_util.flatten_dict(params)
    for e in entries:
        value = np.asarray(leaves[e.ours])
        if e.layers:
            for key, layer in zip(e.hf_keys(), value):
                yield key, np.ascontiguousarray(_to_hf(e.kind, layer))
        else:
            yield e.hf, np.ascontiguousarray(_to_hf(e.kind, value))


def load_hf(
    model: nnx.Module, state_dict: Mapping[str, np.ndarray], entries: list[Entry],
    cfg: ModelConfigLike,
) -> None:
    """Writes an HF state dict into an nnx model in place (checked first; nothing on error)."""
    state = nnx.state(model, nnx.Param)
    current = nnx.to_pure_dict(state)
    pure = from_hf(state_dict, current, entries, cfg)
    # Own copies in the parameter dtype, placed like the parameters they replace: the source
    # arrays may be memory-mapped or shared with torch tensors, and on the CPU device_put may
    # alias a numpy buffer instead of copying it.
    pure = jax.tree.map(
        lambda new, old: jax.device_put(np.array(new, old.dtype), old.sharding), pure, current
    )
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def export_hf(model: nnx.Module, entries: list[Entry]) -> dict[str, np.ndarray]:
    """An nnx model's parameters as an HF state dict (numpy)."""
    return to_hf(nnx.to_pure_dict(nnx.state(model, nnx.Param)), entries)


_ONEVISION_RENAMES = (
    (VISION_PREFIX, "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("lm_head.", "lm_head."),
    (LLM_PREFIX, "model.language_model."),  # last: the other `model.` keys matched above
)


def llava_onevision_key(key: str) -> str:
    """Official LLaDA-V key -> transformers' `LlavaOnevisionForConditionalGeneration` key."""
    for old, new in _ONEVISION_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"no LlavaOnevision name for {key!r}")


# --- Streaming: one block of rows at a time -------------------------------------------------
# A converter never holds a whole stacked parameter: it moves rows of one HF tensor at a time
# (HF's first axis, our axis `_hf_row_axis`).


def row_ranges(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over the first axis of `shape`, each at most ~max_bytes."""
    if not shape:
        return [(0, 1)]
    row = math.prod(shape[1:]) * itemsize
    step = max(1, max_bytes // max(row, 1))
    return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def _our_index(e: Entry, layer: int, start: int, stop: int, ndim: int) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    if ndim:
        index[_hf_row_axis(e.kind, ndim)] = slice(start, stop)
    return (slice(layer, layer + 1), *index) if e.layers else tuple(index)


def blocks_from_hf(
    e: Entry, tensors: Mapping, max_bytes: int, itemsize: int = 4,
    on_tensor: Callable[[str], None] | None = None,
) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Yields (index into our parameter, values) covering parameter `e`, reading at most
    ~max_bytes (at `itemsize` bytes per value) of one HF tensor at a time.

    `tensors` maps HF keys to arrays or lazy tensors sliceable by rows (`t[a:b]`). Blocks of a
    stacked parameter keep a leading layer axis of 1, so every block of one parameter has the
    same shape except at the end of an axis. `on_tensor(key)` runs after each HF tensor.
    """
    for layer, key in enumerate(e.hf_keys()):
        t = tensors[key]
        shape = tuple(t.shape)
        for start, stop in row_ranges(shape, itemsize, max_bytes):
            x = _to_ours(e.kind, np.asarray(t[start:stop] if shape else t))
            yield _our_index(e, layer, start, stop, len(shape)), (x[None] if e.layers else x)
        if on_tensor is not None:
            on_tensor(key)


def hf_blocks(
    e: Entry, layer: int, read: Callable[[tuple[slice, ...]], np.ndarray],
    hf_shape: tuple[int, ...], max_bytes: int, itemsize: int = 4,
) -> Iterator[np.ndarray]:
    """Row blocks (HF layout, contiguous) of the HF tensor `e.hf_keys()[layer]`, each read from
    our parameter by `read(index)` (e.g. a TensorStore slice) at most ~max_bytes at a time."""
    for start, stop in row_ranges(hf_shape, itemsize, max_bytes):
        x = np.asarray(read(_our_index(e, layer, start, stop, len(hf_shape))))
        yield np.ascontiguousarray(_to_hf(e.kind, x[0] if e.layers else x))


# --- Other key layouts ------------------------------------------------------------------------
# LLaDA-8B-Instruct's original (OLMo-style) names -> the HF-port names (docs/design.md §6.2).
_OLMO_BLOCK = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}
_OLMO_TOP = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_HF_PORT = re.compile(
    r"^(model\.(embed_tokens|norm)\.weight|lm_head\.weight|model\.layers\.\d+\..+)$"
)
_OLMO = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.weight$")


def llada_key(key: str) -> str | None:
    """A LLaDA-8B checkpoint key (original OLMo-style or HF-port) -> the HF-port key; None if
    it is neither."""
    if key in _OLMO_TOP:
        return _OLMO_TOP[key]
    m = _OLMO.match(key)
    if m:
        part = _OLMO_BLOCK.get(m.group(2))
        return None if part is None else f"{LLM_PREFIX}layers.{m.group(1)}.{part}.weight"
    return key if _HF_PORT.match(key) else None


# Stored in a full SigLIP(2) checkpoint, never part of the vision tower.
SIGLIP_OTHER = ("text_model.", "logit_scale", "logit_bias")


def siglip_key(key: str) -> str | None:
    """A SigLIP/SigLIP2 HF key (`vision_model.` prefix or none, as transformers 5 saves a
    SiglipVisionModel) -> the official LLaDA-V key; None for the text tower and logit scales."""
    if key.startswith(SIGLIP_OTHER):
        return None
    return VISION_PREFIX + key.removeprefix("vision_model.")

