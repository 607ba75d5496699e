"""A LoRA (or QLoRA) model directory in the official layouts: merged, or as a PEFT adapter.

Merged (`merged_params`, what `export-hf` writes for an adapted model): every weight as the
plain model computes it, read a slice at a time from the stored arrays, so that an export never
holds the model:

    kernel [in, out]   = W + A B * alpha / rank       A = lora_a [in, rank], B = lora_b [rank, out]
    W of a quantized layer = dequantize(qvalue, qscale)   (`lladav_jax.models.quant`)

in the config's `param_dtype`, as `lladav_jax.models.adapters.merge` computes it.

A PEFT adapter directory (`export_adapter`, `import_adapter`) is what `peft` saves for a LoRA
model of the official layout (LLaDA-V's modules: `model.layers.{i}.self_attn.q_proj`, ...,
`model.vision_tower.vision_tower.vision_model.encoder.layers.{i}.mlp.fc1`):

    adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules (a
                                regex matching exactly the adapted modules in full: the vision
                                tower has q_proj too, and layers LLaDA-V never runs)
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [rank, in]
                                base_model.model.<module>.lora_B.weight [out, rank]
                                one pair per adapted module and layer (ours are stacked:
                                lora_a [layers, in, rank] -> lora_A of layer i is lora_a[i].T)

It pairs with the base the model was trained from (the official release, or `export-hf` of
the `init_from` directory); a QLoRA adapter was trained against the dequantized base. Only the
adapters are in it: a run that also trained the connector (optim.lr.connector > 0) is
reproduced by the merged export, not by the adapter on the original base.

Importing (`import_adapter`) adds an adapter to a plain model directory: the result is a model
directory with `lora` in its config and `lora_a` / `lora_b` beside the base's kernels. The
adapted modules are read from the tensors' keys (`target_modules` is not interpreted); a layer
of an adapted module that the adapter leaves out gets a zero adapter (what it computes without
one). Vision layers LLaDA-V never runs are passed over. Everything is checked before anything
is written; one error names every offending key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from lladav_jax import paths
from lladav_jax.checkpoints import modeldir, safetensors_io
from lladav_jax.models import adapters, hf_params, lladav, quant
from lladav_jax.models.config import (
    TEXT_TARGETS,
    VISION_TARGETS,
    LoraConfig,
    ModelConfig,
    ModelConfigLike,
)
from lladav_jax.models.hf_config import ConversionError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft puts before the base model's module names
ADAPTER_DTYPES = ("float32", "bfloat16")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
Key = tuple[str, ...]


# --- Merged weights, a slice at a time ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergedParam:
    """One plain weight (`parent + (leaf,)`, leaf kernel or embedding) of an adapted model
    directory; `p[index]` (a tuple of slices) reads only what that slice needs."""

    shape: tuple[int, ...]
    dtype: np.dtype
    stored: Mapping[Key, modeldir.StoredParam]
    parent: Key
    leaf: str
    scale: float  # alpha / rank

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index)))
        get = lambda leaf: self.stored[(*self.parent, leaf)]
        if (*self.parent, self.leaf) in self.stored:
            w = get(self.leaf)[index]
        else:
            # A scale covers a tile of the axis summed over (a kernel's inputs, an embedding
            # row's features): that axis is read whole, so every value meets its scale.
            axis = len(self.shape) - (1 if self.leaf == "embedding" else 2)
            wide = (*index[:axis], slice(None), *index[axis + 1:])
            w = quant.dequantize(jnp.asarray(get("qvalue")[wide]),
                                 jnp.asarray(get("qscale")[wide]), jnp.dtype(self.dtype))
            w = np.asarray(w)[(slice(None),) * axis + (index[axis],)]
        if (*self.parent, "lora_a") in self.stored:  # A's rows by inputs, B's columns by outputs
            a = get("lora_a")[(*index[:-1], slice(None))]
            b = get("lora_b")[(*index[:-2], slice(None), index[-1])]
            w = adapters.with_delta(w, a, b, self.scale)
        return np.asarray(w, self.dtype)


def merged_params(ckpt: str | os.PathLike, cfg: ModelConfigLike,
                  ) -> dict[Key, modeldir.StoredParam | MergedParam]:
    """Every parameter of the plain model (`cfg.plain()`) by its path, opened for slice reads
    from the model directory `ckpt` whose config is `cfg`: stored ones as they are, adapted or
    quantized ones merged (`MergedParam`)."""
    cfg = ModelConfig.from_config(cfg)
    stored = modeldir.open_params(ckpt)
    if not cfg.adapted:
        return stored
    scale = cfg.lora.alpha / cfg.lora.rank if cfg.lora.rank else 0.0
    out: dict[Key, modeldir.StoredParam | MergedParam] = {}
    for key, target in traverse_util.flatten_dict(lladav.abstract_params(cfg.plain())).items():
        if key in stored and not (key[-1] == "kernel" and (*key[:-1], "lora_a") in stored):
            out[key] = stored[key]
        else:
            out[key] = MergedParam(tuple(target.shape), np.dtype(target.dtype), stored, key[:-1],
                                   key[-1], scale)
    return out


# --- The modules an adapter may hold -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Module:
    """One adaptable linear layer, stacked over `layers`: our path to it and its official
    module name (`{i}` the layer)."""

    ours: Key  # e.g. ("llm", "layers", "q"); lora_a / lora_b / kernel below it
    name: str  # e.g. "model.layers.{i}.self_attn.q_proj"
    layers: int

    @property
    def vision(self) -> bool:
        return self.ours[0] == "vision"

    @property
    def target(self) -> str:  # its name in LoraConfig.targets / vision_targets
        return self.ours[-1]


def modules(cfg: ModelConfigLike) -> list[Module]:
    """Every layer LoRA can adapt (config.TEXT_TARGETS and VISION_TARGETS), in table order."""
    return [Module(e.ours[:-1], e.hf.removesuffix(".weight"), e.layers)
            for e in hf_params.lladav_entries(cfg)
            if e.layers and e.kind == "linear" and e.ours[-2] in (
                VISION_TARGETS if e.ours[0] == "vision" else TEXT_TARGETS)]


def adapted_modules(cfg: ModelConfigLike) -> list[Module]:
    """The layers the config's `lora` adapts."""
    lora = ModelConfig.from_config(cfg).lora
    if not lora.rank:
        return []
    return [m for m in modules(cfg)
            if m.target in (lora.vision_targets if m.vision else lora.targets)]


def target_modules(cfg: ModelConfigLike) -> str:
    """A regex that peft matches in full against the official module names: exactly the
    adapted modules, in exactly the layers we hold (the stored vision tower has one more)."""
    groups: dict[tuple[str, int], list[str]] = {}
    for m in adapted_modules(cfg):
        head, tail = m.name.split("{i}.")
        groups.setdefault((head, m.layers), []).append(re.escape(tail))
    return "|".join(rf"{re.escape(head)}(?:{'|'.join(map(str, range(n)))})\.(?:{'|'.join(tails)})"
                    for (head, n), tails in groups.items())


def adapter_config(cfg: ModelConfigLike) -> dict:
    """adapter_config.json: peft's LoraConfig fields for the config's adapters (plain LoRA:
    scale alpha / r, dropout on the input, no bias)."""
    lora = ModelConfig.from_config(cfg).lora
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": "",
            "r": lora.rank, "lora_alpha": alpha, "lora_dropout": lora.dropout,
            "target_modules": target_modules(cfg), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


# --- Export --------------------------------------------------------------------------------


def export_adapter(
    ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
    allow_nonfinite: bool = False,
) -> epath.Path:
    """A LoRA model directory (or training workdir) -> a PEFT adapter directory `out`."""
    if dtype not in ADAPTER_DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {list(ADAPTER_DTYPES)}")
    cfg = ModelConfig.from_config(modeldir.load_config(ckpt))
    if not cfg.lora.rank:
        raise ConversionError(f"{ckpt} has no adapters (lora.rank 0): export it whole, "
                              "without --adapter_only")
    modeldir.check_params(ckpt, cfg.to_config())
    lrs = modeldir.run_config(modeldir.resolve(ckpt).config.parent).get("optim", {}).get("lr", {})
    if isinstance(lrs, Mapping) and float(lrs.get("connector", 0.0)) > 0:
        warnings.warn(f"{ckpt}: the run trained the connector (optim.lr.connector "
                      f"{lrs['connector']}), which an adapter does not hold; the merged export "
                      "(without --adapter_only) reproduces the model", stacklevel=2)
    stored = modeldir.open_params(ckpt)
    out_dtype = safetensors_io.DTYPES[safetensors_io.dtype_code(dtype)]

    def block(p: modeldir.StoredParam, layer: int, key: str) -> Callable[[], list[np.ndarray]]:
        def read() -> list[np.ndarray]:
            x = np.ascontiguousarray(p[layer].T)  # ours [in, rank] / [rank, out] -> peft's
            if not allow_nonfinite and not np.isfinite(x).all():
                raise ConversionError(f"{key} holds NaN or inf; the adapter comes from a "
                                      "diverged run (--allow_nonfinite converts it anyway)")
            return [x]
        return read

    tensors = []
    for m in adapted_modules(cfg):
        for i in range(m.layers):
            for leaf, part in (("lora_a", "A"), ("lora_b", "B")):
                p = stored[(*m.ours, leaf)]
                key = f"{PREFIX}{m.name.format(i=i)}.lora_{part}.weight"
                tensors.append(safetensors_io.PendingTensor(key, tuple(p.shape[1:][::-1]),
                                                            out_dtype, block(p, i, key)))
    if not tensors:
        raise ConversionError(f"{ckpt}: lora.targets and lora.vision_targets are empty; there "
                              "is no adapter to export")
    with modeldir.atomic_dir(out) as tmp:
        safetensors_io.write_file(tmp / ADAPTER_FILE, tensors)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg), indent=2) + "\n")
    return paths.as_path(out)


# --- Import --------------------------------------------------------------------------------

# peft settings that make an adapter compute something else than plain LoRA, with the values
# under which it is plain LoRA.
_PLAIN_LORA = {
    "use_dora": (False, None), "use_rslora": (False, None), "bias": ("none", None),
    "lora_bias": (False, None), "fan_in_fan_out": (False, None), "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None), "modules_to_save": (None, []),
    "trainable_token_indices": (None,), "layer_replication": (None,),
    "target_parameters": (None, []), "alora_invocation_tokens": (None,),
}


def _read_config(adapter_dir: epath.Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise ConversionError(f"{path} not found: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA "
                              "adapters can be imported")
    odd = [f"{k} {config[k]!r}" for k, plain in _PLAIN_LORA.items()
           if k in config and config[k] not in plain]
    if odd:
        raise ConversionError(f"{path}: settings beyond plain LoRA, which our layers do not "
                              "compute: " + ", ".join(odd))
    for k in ("r", "lora_alpha"):
        if not isinstance(config.get(k), int | float) or config[k] <= 0:
            raise ConversionError(f"{path}: {k} {config.get(k)!r} must be a positive number")
    return config


def _adapter_arrays(tensors: Mapping, config: dict, cfg: ModelConfig, where: epath.Path,
                    allow_nonfinite: bool) -> tuple[dict[Key, np.ndarray], set[Module]]:
    """Stacked lora_a [layers, in, r] / lora_b [layers, r, out] (float32) from peft's tensors,
    and the modules they adapt; one ConversionError listing every problem."""
    r = int(config["r"])
    kernels = traverse_util.flatten_dict(lladav.abstract_params(cfg))
    by_name = {m.name.format(i=i): (m, i) for m in modules(cfg) for i in range(m.layers)}
    found: dict[tuple[Module, str], dict[int, np.ndarray]] = {}
    unknown, bad, ranks = [], [], set()
    for key, t in sorted(tensors.items()):
        match = _KEY.match(key)
        module = match and match["module"]
        if match and module not in by_name and hf_params.is_ignored_hf_key(module + ".weight",
                                                                           cfg):
            continue  # a vision layer past select_layer: LLaDA-V never runs it
        if not match or module not in by_name:
            unknown.append(key)
            continue
        m, layer = by_name[module]
        d_in, d_out = kernels[(*m.ours, "kernel")].shape[1:]
        want = (r, d_in) if match["part"] == "A" else (d_out, r)
        if len(t.shape) == 2:
            ranks.add(t.shape[0] if match["part"] == "A" else t.shape[1])
        if tuple(t.shape) != want:
            bad.append(f"{key}: stored {tuple(t.shape)}, expected {want}")
        elif getattr(t, "code", "F32") not in ("F32", "BF16", "F16", "F64"):
            bad.append(f"{key}: dtype {t.code}, not a float")
        else:
            x = np.asarray(t, np.float32).T  # peft's [rank, in] / [out, rank] -> ours
            if not allow_nonfinite and not np.isfinite(x).all():
                bad.append(f"{key} holds NaN or inf")
            found.setdefault((m, match["part"]), {})[layer] = x
    other = {"A": "B", "B": "A"}
    unpaired = sorted(f"{m.name.format(i=i)}: lora_{part} without lora_{other[part]}"
                      for (m, part), layers in found.items() for i in layers
                      if i not in found.get((m, other[part]), {}))
    problems = []
    if len(ranks) == 1 and ranks != {r}:
        problems.append(f"rank: {ADAPTER_CONFIG} says r {r}, the tensors have rank {ranks.pop()}")
    for what, keys in (("modules LLaDA-V does not have or cannot adapt", unknown),
                       ("wrong tensors", bad), ("unpaired", unpaired)):
        if keys:
            problems.append(f"{what} ({len(keys)}): " + ", ".join(keys[:20])
                            + (" ..." if len(keys) > 20 else ""))
    if not problems and not found:
        problems.append(f"{ADAPTER_FILE} holds no LoRA tensors")
    if problems:
        raise ConversionError(f"{where} does not fit the base model:\n  " + "\n  ".join(problems))
    arrays = {}
    for (m, part), layers in found.items():
        shape = kernels[(*m.ours, "kernel")].shape
        stack = np.zeros((m.layers, shape[1], r) if part == "A" else (m.layers, r, shape[2]),
                         np.float32)  # a layer left out: a zero adapter, the plain layer
        for i, x in layers.items():
            stack[i] = x
        arrays[(*m.ours, "lora_a" if part == "A" else "lora_b")] = stack
    return arrays, {m for m, _ in found}


def _stored_blocks(p: modeldir.StoredParam, block_bytes: int,
                   ) -> Callable[[], Iterator[tuple[tuple[slice, ...], np.ndarray]]]:
    def blocks():
        if not p.shape:
            yield (), p[()]
            return
        for a, b in hf_params.row_ranges(p.shape, p.dtype.itemsize, block_bytes):
            index = (slice(a, b),) + (slice(None),) * (len(p.shape) - 1)
            yield index, p[index]
    return blocks


def import_adapter(
    adapter_dir: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
    block_bytes: int = 16 << 20, allow_nonfinite: bool = False,
) -> epath.Path:
    """A PEFT adapter directory + the plain model directory `base` it adapts -> a LoRA model
    directory `out` (the base's weights, config and tokenizer, with the adapters)."""
    adapter_dir = paths.as_path(adapter_dir)
    config = _read_config(adapter_dir)
    base_cfg = ModelConfig.from_config(modeldir.load_config(base))
    if base_cfg.adapted:
        raise ConversionError(f"{base} holds adapters or quantized weights; the base must be a "
                              "plain model directory (export-hf merges such a model)")
    modeldir.check_params(base, base_cfg.to_config())
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise ConversionError(f"{adapter_dir / ADAPTER_FILE} not found")
    tensors = safetensors_io.read_header(adapter_dir / ADAPTER_FILE)
    arrays, adapted = _adapter_arrays(tensors, config, base_cfg, adapter_dir, allow_nonfinite)
    lora = LoraConfig(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=tuple(t for t in TEXT_TARGETS if any(m.target == t and not m.vision
                                                     for m in adapted)),
        vision_targets=tuple(t for t in VISION_TARGETS if any(m.target == t and m.vision
                                                              for m in adapted)))
    cfg = dataclasses.replace(base_cfg, lora=lora)
    params = {key: modeldir.LazyParam(p.shape, p.dtype, _stored_blocks(p, block_bytes))
              for key, p in modeldir.open_params(base).items()}
    params.update(arrays)
    return modeldir.save_model_dir(out, traverse_util.unflatten_dict(params), cfg.to_config(),
                                   tokenizer_dir=modeldir.resolve(base).tokenizer_dir)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILE", "MergedParam", "Module", "adapted_modules",
           "adapter_config", "export_adapter", "import_adapter", "merged_params", "modules",
           "target_modules"]
