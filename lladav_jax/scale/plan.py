"""Does a run fit a topology (`lladav-plan`), and how fast
could it go? Compiles, never allocates.

The train step is built as `lladav-train` builds it (`model_layout`, `jit_train_step`,
`abstract_batch`: the same shardings, the same donation) on a mesh of the topology's device
count from `config.mesh`, and compiled ahead of time from ShapeDtypeStructs. Where the target's
compiler is absent (a machine without those TPUs or GPUs) it compiles for the CPU with that
many simulated devices and says so: XLA:CPU partitions the program exactly as XLA:TPU would,
but its buffer assignment, fusion and layouts differ, so temporaries are an estimate.

Reported per device: parameters and optimizer state (analytic, from each leaf's sharding, and
the compiled argument sizes), temporaries (activations, gradients), generated code; FLOPs per
step (XLA's count and `flops.flops_per_step`); the step time and tokens/s per chip at a
stated MFU; whether it fits the HBM of each known chip with a margin. Optionally the sampler
(`--sampler`) at a stated batch, prompt and answer length, for inference memory.

LoRA and QLoRA (`config.lora.rank`, `config.quantize.weights`): the parameters split into
trained (adapters, the connector) and frozen (the base: no optimizer state, no gradients), and
every array counted at its stored size, int4 at half a byte (`nbytes`). `--inference` plans the
sampler alone, `--quantize int8|int4` its weights stored so (`inference_model`): weights, K/V
cache and temporaries per device. `state_bytes` / `inference_weight_bytes` give the analytic
figures without compiling.

    lladav-plan --config configs/stage2a.py --topology v5p-64 [--devices N] [--mfu 0.45]
        [--hbm_margin 0.1] [--json plan.json] [--nosampler] [--config.data.seq_len=4096]
    lladav-plan --config configs/lora.py --topology v5e-1 --config.quantize.weights=int4
    lladav-plan --inference --quantize int8 --config configs/stage2a.py --topology v5e-1
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from lladav_jax.scale import topology as topo
from lladav_jax.scale.memory import GIB, global_bytes, nbytes, per_device_bytes

if TYPE_CHECKING:  # JAX is imported inside the functions (see below)
    import ml_collections
    from jax.sharding import Mesh

    from lladav_jax.data.tokenizer import Tokenizer

# JAX and the model are imported inside the functions: the CLI sets the device count first,
# before any import could start JAX's backend (which fixes the count).


def use_simulated_cpu_devices(n: int) -> None:
    """Makes JAX's CPU backend present `n` devices. Must run before the backend starts (the
    first `jax.devices()`): the device count is fixed then."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={n}".strip()
    import jax

    # Also the config option: it wins over a count that XLA_FLAGS parsed earlier may hold.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    batch: int = 1
    prompt_len: int = 0  # 0: image.max_visual_tokens + 128
    gen_length: int = 128
    block_length: int = 32
    cache: str = "dual"


def _mask_id(config: ml_collections.ConfigDict) -> tuple[int, str | None]:
    """The tokenizer's mask id (a constant in the program; memory and FLOPs do not depend on
    it). An unreadable tokenizer path falls back to the demo tokenizer, with a note."""
    from lladav_jax.train.inputs import load_tokenizer

    try:
        return load_tokenizer(config.tokenizer).mask_id, None
    except (OSError, ValueError) as e:
        note = (f"tokenizer {config.tokenizer!r} unreadable here ({type(e).__name__}); the mask "
                "id of the demo tokenizer stands in (it is only a constant in the program)")
        return load_tokenizer("").mask_id, note


def lower_train_step(config: ml_collections.ConfigDict, mesh: Mesh, mask_id: int = 0):
    """(lowered step, layout, abstract state, abstract batch): the trainer's step traced and
    lowered from ShapeDtypeStructs on `mesh` (nothing is allocated)."""
    import jax

    from lladav_jax.scale import sharding
    from lladav_jax.train import optim
    from lladav_jax.train.state import (
        abstract_batch,
        abstract_train_state,
        jit_train_step,
        model_layout,
        step_options,
    )

    # The schedule's length only changes constants of the program, not its shapes.
    tx, _ = optim.make_optimizer(config.optim, config.train.steps or 1000)
    layout = model_layout(config, mesh, tx)
    state = abstract_train_state(tx, layout, mesh)
    batch = abstract_batch(config, mesh)
    step = jit_train_step(layout.step_graphdef, tx, mask_id,
                          jax.tree.map(lambda x: x.sharding, state),
                          **step_options(config.train))
    # Under the mesh and rules, as the loop runs it: activation constraints take effect.
    with sharding.sharding_context(mesh, layout.rules):
        lowered = step.lower(state, layout.frozen, batch)
    return lowered, layout, state, batch


# XLA:CPU has no bf16 (or int4) dots: it converts weights to float32, moves the convert in
# front of the layer scan's dynamic-slice and hoists it out of the loop, so the f32 copy of every
# layer's weights lives at once (26 GiB of temporaries for the 8b LoRA step with a bf16 base,
# where a TPU or GPU multiplies bf16 directly). Without loop-invariant code motion the copy is
# one layer's, inside the loop. Only for the simulated compile: a device's own compiler is
# left as it is.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _compile(lowered, simulated: bool):
    return lowered.compile(compiler_options=CPU_COMPILER_OPTIONS if simulated else None)


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
    # Live at once: inputs, outputs not written into donated inputs, temporaries, code.
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + \
        out["generated_code"]
    return out


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


def inference_model(model: ml_collections.ConfigDict,
                    quantize: str | None = None) -> ml_collections.ConfigDict:
    """The model the sampler runs. Without `quantize`: the config's own (a LoRA / QLoRA config
    with its adapters and quantized base, as a run's checkpoint holds them). With it (none |
    int8 | int4): the plain model, adapters merged, its weights stored in that format, as
    `modeldir.load_model(DIR, quantize=...)` loads it for inference."""
    if not quantize:
        return model
    from lladav_jax.models.config import ModelConfig

    typed = ModelConfig.from_config(model)
    return dataclasses.replace(typed.plain(), quantize=dataclasses.replace(
        typed.quantize, weights=quantize)).to_config()


def kv_cache_bytes(model: ml_collections.ConfigDict, spec: SamplerSpec, prompt_len: int) -> int:
    """The sampler's K/V cache (`LLaDA.init_cache`: K and V of every layer, [layers, batch,
    prompt + answer, kv_heads, head_dim] in the compute dtype; none without a cache), whole:
    a batch of 1 cannot be split over the batch axes, so one chip holds all of it."""
    if spec.cache == "none":
        return 0
    t = model.text
    shape = (2, t.num_layers, spec.batch, prompt_len + spec.gen_length, t.num_kv_heads,
             t.head_dim)
    return nbytes(shape, model.dtype)


def _quantized(state) -> Any:
    """The quantized weights (`qvalue`, `qscale`) of an nnx state."""
    from flax import nnx

    from lladav_jax.models.dense import QuantizedParam

    return nnx.filter_state(state, QuantizedParam)


def _compile_sampler(config: ml_collections.ConfigDict, mesh: Mesh, spec: SamplerSpec,
                     tokenizer: Tokenizer, model: ml_collections.ConfigDict | None = None,
                     simulated: bool = False) -> dict:
    """The sampler's program (`sampler.jit_generate`, as `compiled_generate` runs it) for
    `model` (default config.model), parameters sharded as `lv.load(DIR, mesh)` places them,
    the prompt replicated."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from lladav_jax.data.layout import collate_visual
    from lladav_jax.diffusion import sampler
    from lladav_jax.diffusion.options import SamplerOptions, SpecialIds
    from lladav_jax.models import lladav
    from lladav_jax.scale import sharding

    model = model if model is not None else config.model
    graphdef, state = nnx.split(lladav.abstract(model))
    rules = sharding.logical_rules(config.mesh.get("rules"))
    state = sharding.abstract_with_shardings(state, sharding.state_shardings(state, mesh, rules))
    sharding.check_divisible(state)
    prompt_len = spec.prompt_len or int(model.image.max_visual_tokens) + 128
    options = SamplerOptions(gen_length=spec.gen_length, steps=spec.gen_length,
                             block_length=spec.block_length, cache=spec.cache)
    ids = SpecialIds.from_tokenizer(tokenizer)
    replicated = NamedSharding(mesh, PartitionSpec())
    one = collate_visual([[]], model, prompt_len + spec.gen_length)
    prompt = {"tokens": np.zeros((spec.batch, prompt_len), np.int32),
              "valid": np.zeros((spec.batch, prompt_len), bool)}
    prompt.update({k: np.broadcast_to(v, (spec.batch, *v.shape[1:])) for k, v in one.items()})
    prompt = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
              for k, v in prompt.items()}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)

    start = time.perf_counter()
    compiled = _compile(sampler.jit_generate(graphdef, options, ids).lower(state, prompt, rng),
                        simulated)
    return {"batch": spec.batch, "prompt_len": prompt_len, "gen_length": spec.gen_length,
            "block_length": spec.block_length, "steps": spec.gen_length, "cache": spec.cache,
            "weights": model.quantize.weights if "quantize" in model else "none",
            "param_dtype": model.param_dtype, "dtype": model.dtype,
            "compile_s": time.perf_counter() - start, "memory": _memory(compiled),
            "parameters_per_device": per_device_bytes(state),
            "quantized_per_device": per_device_bytes(_quantized(state)),
            "kv_cache": kv_cache_bytes(model, spec, prompt_len)}


def _state_breakdown(layout: Any, opt_state: Any, grad_accum: int) -> dict[str, int]:
    """Bytes of the run's state per device (and in all), from each leaf's sharding: the trained
    parameters, the frozen ones (no optimizer state, no gradients; quantized ones at their
    stored size), the optimizer state (over the trained part only) and the gradients."""
    trained = per_device_bytes(layout.trainable)
    # The step's gradients mirror the trained parameters (in their dtypes); with grad_accum > 1
    # the scan's running sum is a second copy. Both live in the temporaries, never as arguments.
    grad_copies = 2 if grad_accum > 1 else 1
    return {
        "parameters": per_device_bytes((layout.trainable, layout.frozen)),
        "parameters_trained": trained,
        "parameters_frozen": per_device_bytes(layout.frozen),
        "parameters_quantized": per_device_bytes(_quantized(layout.frozen)),
        "optimizer_state": per_device_bytes(opt_state),
        "gradients": grad_copies * trained,
        "parameters_global": global_bytes(layout.sharded),
        "optimizer_state_global": global_bytes(opt_state),
    }


def state_bytes(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, int]:
    """The analytic part of a plan without compiling anything (seconds for the 8b model):
    the run's parameters, optimizer state and gradients per device, as `plan` reports them."""
    from lladav_jax.train import optim
    from lladav_jax.train.state import abstract_opt_state, model_layout

    _check_trainable(config)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps or 1000)
    layout = model_layout(config, mesh, tx)
    return _state_breakdown(layout, abstract_opt_state(tx, layout), config.train.grad_accum)


def inference_weight_bytes(config: ml_collections.ConfigDict, mesh: Mesh,
                           quantize: str | None = None) -> dict[str, int]:
    """The sampler's weights per device without compiling: all of them, and the quantized
    ones, of `inference_model(config.model, quantize)` placed as `lv.load(DIR, mesh)` does."""
    from flax import nnx

    from lladav_jax.models import lladav
    from lladav_jax.scale import sharding

    _, state = nnx.split(lladav.abstract(inference_model(config.model, quantize)))
    rules = sharding.logical_rules(config.mesh.get("rules"))
    state = sharding.abstract_with_shardings(state, sharding.state_shardings(state, mesh, rules))
    return {"parameters": per_device_bytes(state),
            "quantized": per_device_bytes(_quantized(state))}


def _check_trainable(config: ml_collections.ConfigDict) -> None:
    """Quantized weights train only through adapters (as `config_check` refuses such a run):
    without LoRA the step would differentiate integers."""
    quantize = config.model.get("quantize", {}).get("weights", "none")
    if quantize != "none" and int(config.model.get("lora", {}).get("rank", 0)) == 0:
        raise ValueError(f"quantize.weights={quantize} without LoRA: quantized weights are "
                         "frozen, train them through adapters (--config.lora.rank=16) or plan "
                         "inference alone (--inference --quantize " + quantize + ")")


def _make_mesh(config: ml_collections.ConfigDict, target: topo.Topology,
               devices: int | None) -> tuple[Mesh, int]:
    import jax

    from lladav_jax.scale import sharding

    n = devices or target.chips * int(config.mesh.get("slices", 1))
    available = jax.devices()
    if len(available) < n:
        raise sharding.MeshError(
            f"planning for {n} devices but this process has {len(available)} "
            f"({jax.default_backend()}); run `lladav-plan`, which simulates them on the CPU")
    return sharding.make_mesh(dict(config.mesh), available[:n]), n


def _simulated(target: topo.Topology) -> bool:
    """Compiled by XLA:CPU for a TPU or GPU target (simulated devices)."""
    import jax

    return jax.default_backend() == "cpu" and target.chip.platform != "cpu"


def _compiled_for(target: topo.Topology, n: int) -> str:
    import jax

    if _simulated(target):
        return f"cpu ({n} simulated devices; {target.chip.name} compiler not available here)"
    return f"{jax.default_backend()} ({n} devices)"


def _fits(total: int, hbm_margin: float) -> dict[str, dict]:
    return {key: {"hbm_gib": chip.hbm_gib, "usable_gib": _usable(chip, hbm_margin) / GIB,
                  "fits": total <= _usable(chip, hbm_margin)}
            for key, chip in topo.CHIPS.items()}


def plan(config: ml_collections.ConfigDict, target: topo.Topology, devices: int | None = None,
         *, mfu: float = 0.45, hbm_margin: float = 0.1, sampler_spec: SamplerSpec | None = None,
         quantize: str | None = None) -> dict[str, Any]:
    """Compiles the train step (and optionally the sampler, of `inference_model(config.model,
    quantize)`) for `devices` of this process's devices (default: the topology's chips x
    mesh.slices) and returns the figures."""
    from lladav_jax.models import flops
    from lladav_jax.train.inputs import load_tokenizer
    from lladav_jax.train.state import check_batch

    _check_trainable(config)
    slices = int(config.mesh.get("slices", 1))
    mesh, n = _make_mesh(config, target, devices)
    check_batch(config, mesh)
    d = config.data
    mask_id, note = _mask_id(config)

    start = time.perf_counter()
    lowered, layout, state, batch = lower_train_step(config, mesh, mask_id)
    lower_s = time.perf_counter() - start
    simulated = _simulated(target)
    compiled = _compile(lowered, simulated)
    compile_s = time.perf_counter() - start - lower_s

    tiles = d.batch_size * int(config.model.image.max_tiles)
    analytic = flops.flops_per_step(config.model, (d.batch_size, d.seq_len), tiles)
    analytic *= 2 if config.train.get("complementary_masking", False) else 1  # rows run twice
    xla_flops = _flops(compiled)
    memory = _memory(compiled)
    hbm_use = _fits(memory["total"], hbm_margin)
    step_s = analytic / (mfu * target.peak_flops * n)
    tokens = d.batch_size * d.seq_len
    result: dict[str, Any] = {
        "mode": "train",
        "config": config.model.name, "topology": target.name, "family": target.family,
        "chip": target.chip.name,
        "devices": n, "slices": slices, "mesh": dict(mesh.shape),
        "compiled_for": _compiled_for(target, n),
        "batch": {"global_rows": d.batch_size, "seq_len": d.seq_len,
                  "grad_accum": config.train.grad_accum, "tiles": tiles,
                  "shapes": {k: list(v.shape) for k, v in batch.items()}},
        "params": {**_base_counts(config.model),
                   "trained": sum(math.prod(x.shape) for x in _leaves(layout.trainable))},
        "adapters": _adapters(config.model),
        "per_device": {
            **_state_breakdown(layout, state.opt_state, config.train.grad_accum),
            "batch": per_device_bytes(batch),
            "compiled": memory,
        },
        "flops_per_step": {"analytic": analytic, "analytic_per_device": analytic / n,
                           "xla_per_device": xla_flops},
        "at_mfu": {"mfu": mfu, "peak_tflops_per_chip": target.chip.peak_tflops,
                   "step_s": step_s, "tokens_per_s_per_chip": tokens / step_s / n,
                   "tokens_per_s": tokens / step_s},
        "hbm_margin": hbm_margin,
        "fits": hbm_use,
        "fits_target": hbm_use[target.family]["fits"],
        "lower_s": lower_s, "compile_s": compile_s, "notes": [note] if note else [],
    }
    if sampler_spec is not None:
        tokenizer = load_tokenizer(config.tokenizer if note is None else "")
        result["sampler"] = _compile_sampler(config, mesh, sampler_spec, tokenizer,
                                             inference_model(config.model, quantize), simulated)
        result["sampler"]["fits"] = {
            k: fit["fits"] for k, fit in _fits(result["sampler"]["memory"]["total"],
                                               hbm_margin).items()}
    return result


def plan_inference(config: ml_collections.ConfigDict, target: topo.Topology,
                   devices: int | None = None, *, spec: SamplerSpec = SamplerSpec(),
                   quantize: str | None = None, hbm_margin: float = 0.1) -> dict[str, Any]:
    """Compiles the sampler alone (no train step) for `inference_model(config.model,
    quantize)`: weights per device at their stored size, the K/V cache, the program's
    temporaries, and whether it fits each chip."""
    from lladav_jax.train.inputs import load_tokenizer

    mesh, n = _make_mesh(config, target, devices)
    _, note = _mask_id(config)
    model = inference_model(config.model, quantize)
    tokenizer = load_tokenizer(config.tokenizer if note is None else "")
    s = _compile_sampler(config, mesh, spec, tokenizer, model, _simulated(target))
    fits = _fits(s["memory"]["total"], hbm_margin)
    return {"mode": "inference", "config": config.model.name, "topology": target.name,
            "family": target.family, "chip": target.chip.name, "devices": n,
            "slices": int(config.mesh.get("slices", 1)), "mesh": dict(mesh.shape),
            "compiled_for": _compiled_for(target, n), "params": _base_counts(model),
            "sampler": s, "hbm_margin": hbm_margin, "fits": fits,
            "fits_target": fits[target.family]["fits"], "notes": [note] if note else []}


def _leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


def _base_counts(model: ml_collections.ConfigDict) -> dict[str, int]:
    """Parameter counts of the model without adapters or quantization (`qscale` and LoRA
    factors are not parameters of the model people name)."""
    from lladav_jax.models import lladav
    from lladav_jax.models.config import ModelConfig

    return lladav.param_counts(ModelConfig.from_config(model).plain())


def _adapters(model: ml_collections.ConfigDict) -> dict[str, Any]:
    from lladav_jax.models.config import ModelConfig

    typed = ModelConfig.from_config(model)
    return {"rank": typed.lora.rank, "targets": list(typed.lora.targets),
            "vision_targets": list(typed.lora.vision_targets),
            "weights": typed.quantize.weights}


def _usable(chip: topo.Chip, hbm_margin: float) -> float:
    """Bytes of a chip's HBM a plan may fill, `hbm_margin` kept free."""
    return chip.hbm_gib * GIB * (1 - hbm_margin)
