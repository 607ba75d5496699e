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

    lladav-plan --config configs/stage2a.py --topology v5p-64 [--devices N] [--mfu 0.45]
        [--hbm_margin 0.1] [--json plan.json] [--nosampler] [--config.data.seq_len=4096]
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from lladav_jax.scale import topology as topo

if TYPE_CHECKING:  # JAX is imported inside the functions (see below)
    import ml_collections
    from jax.sharding import Mesh

    from lladav_jax.data.tokenizer import Tokenizer

GIB = 1024**3
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


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs: every leaf's
    shard (`sharding.shard_shape`; replicated leaves count whole on every device)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        total += math.prod(_shard_shape(leaf)) * np.dtype(leaf.dtype).itemsize
    return total


def _shard_shape(leaf) -> tuple[int, ...]:
    """One device's shard of a leaf; a dimension its mesh axes do not divide is padded to the
    ceiling, as XLA pads it (`Sharding.shard_shape` refuses those)."""
    from jax.sharding import NamedSharding

    sharding = leaf.sharding
    if not isinstance(sharding, NamedSharding):
        return sharding.shard_shape(leaf.shape)
    from lladav_jax.scale.sharding import axes_size

    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    return tuple(-(-dim // axes_size(sharding.mesh, axes)) for dim, axes in zip(leaf.shape, spec))


def _global_bytes(tree) -> int:
    import jax
    import numpy as np

    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


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
    )

    # The schedule's length only changes constants of the program, not its shapes.
    tx, _ = optim.make_optimizer(config.optim, config.train.steps or 1000)
    layout = model_layout(config, mesh, tx)
    state = abstract_train_state(tx, layout, mesh)
    batch = abstract_batch(config, mesh)
    step = jit_train_step(layout.step_graphdef, tx, mask_id,
                                  jax.tree.map(lambda x: x.sharding, state))
    # Under the mesh and rules, as the loop runs it: activation constraints take effect.
    with sharding.sharding_context(mesh, layout.rules):
        lowered = step.lower(state, layout.frozen, batch)
    return lowered, layout, state, batch


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


def _compile_sampler(config: ml_collections.ConfigDict, mesh: Mesh, spec: SamplerSpec,
                     tokenizer: Tokenizer) -> dict:
    """The sampler's program (`sampler.jit_generate`, as `compiled_generate` runs it),
    parameters sharded as `lv.load(DIR, mesh)` places them, the prompt replicated."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from lladav_jax.data.layout import collate_visual
    from lladav_jax.diffusion import sampler
    from lladav_jax.models import lladav
    from lladav_jax.scale import sharding

    graphdef, state = nnx.split(lladav.abstract(config.model))
    rules = sharding.logical_rules(config.mesh.get("rules"))
    state = sharding.abstract_with_shardings(state, sharding.state_shardings(state, mesh, rules))
    prompt_len = spec.prompt_len or int(config.model.image.max_visual_tokens) + 128
    options = sampler.SamplerOptions(gen_length=spec.gen_length, steps=spec.gen_length,
                                     block_length=spec.block_length, cache=spec.cache)
    ids = sampler.SpecialIds.from_tokenizer(tokenizer)
    replicated = NamedSharding(mesh, PartitionSpec())
    one = collate_visual([[]], config.model, prompt_len + spec.gen_length)
    prompt = {"tokens": np.zeros((spec.batch, prompt_len), np.int32),
              "valid": np.zeros((spec.batch, prompt_len), bool)}
    prompt.update({k: np.broadcast_to(v, (spec.batch, *v.shape[1:])) for k, v in one.items()})
    prompt = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
              for k, v in prompt.items()}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)

    start = time.perf_counter()
    compiled = sampler.jit_generate(graphdef, options, ids).lower(state, prompt, rng).compile()
    return {"batch": spec.batch, "prompt_len": prompt_len, "gen_length": spec.gen_length,
            "block_length": spec.block_length, "steps": spec.gen_length, "cache": spec.cache,
            "compile_s": time.perf_counter() - start, "memory": _memory(compiled),
            "parameters_per_device": per_device_bytes(state)}


def plan(config: ml_collections.ConfigDict, target: topo.Topology, devices: int | None = None,
         *, mfu: float = 0.45, hbm_margin: float = 0.1,
         sampler_spec: SamplerSpec | None = None) -> dict[str, Any]:
    """Compiles the train step (and optionally the sampler) for `devices` of this process's
    devices (default: the topology's chips x mesh.slices) and returns the figures."""
    import jax

    from lladav_jax.models import flops, lladav
    from lladav_jax.scale import sharding
    from lladav_jax.train.inputs import load_tokenizer
    from lladav_jax.train.state import (
        check_batch,
    )

    slices = int(config.mesh.get("slices", 1))
    n = devices or target.chips * slices
    available = jax.devices()
    if len(available) < n:
        raise sharding.MeshError(
            f"planning for {n} devices but this process has {len(available)} "
            f"({jax.default_backend()}); run `lladav-plan`, which simulates them on the CPU")
    mesh = sharding.make_mesh(dict(config.mesh), available[:n])
    check_batch(config, mesh)
    d = config.data
    mask_id, note = _mask_id(config)
    backend = jax.default_backend()
    simulated = backend == "cpu" and target.chip.platform != "cpu"

    start = time.perf_counter()
    lowered, layout, state, batch = lower_train_step(config, mesh, mask_id)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s

    tiles = d.batch_size * int(config.model.image.max_tiles)
    analytic = flops.flops_per_step(config.model, (d.batch_size, d.seq_len), tiles)
    xla_flops = _flops(compiled)
    memory = _memory(compiled)
    hbm_use = {key: {"hbm_gib": chip.hbm_gib, "usable_gib": _usable(chip, hbm_margin) / GIB,
                     "fits": memory["total"] <= _usable(chip, hbm_margin)}
               for key, chip in topo.CHIPS.items()}
    step_s = analytic / (mfu * target.peak_flops * n)
    tokens = d.batch_size * d.seq_len
    result: dict[str, Any] = {
        "config": config.model.name, "topology": target.name, "family": target.family,
        "chip": target.chip.name,
        "devices": n, "slices": slices, "mesh": dict(mesh.shape),
        "compiled_for": (f"cpu ({n} simulated devices; {target.chip.name} compiler not "
                         "available here)" if simulated else f"{backend} ({n} devices)"),
        "batch": {"global_rows": d.batch_size, "seq_len": d.seq_len,
                  "grad_accum": config.train.grad_accum, "tiles": tiles,
                  "shapes": {k: list(v.shape) for k, v in batch.items()}},
        "params": lladav.param_counts(config.model),
        "per_device": {
            "parameters": per_device_bytes((layout.trainable, layout.frozen)),
            "optimizer_state": per_device_bytes(state.opt_state),
            "parameters_global": _global_bytes(layout.sharded),
            "optimizer_state_global": _global_bytes(state.opt_state),
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
        result["sampler"] = _compile_sampler(config, mesh, sampler_spec, tokenizer)
        result["sampler"]["fits"] = {
            k: result["sampler"]["memory"]["total"] <= _usable(c, hbm_margin)
            for k, c in topo.CHIPS.items()}
    return result


def _usable(chip: topo.Chip, hbm_margin: float) -> float:
    """Bytes of a chip's HBM a plan may fill, `hbm_margin` kept free."""
    return chip.hbm_gib * GIB * (1 - hbm_margin)


def _gib(b: float) -> str:
    return f"{b / GIB:8.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:8.2f} MiB"


def report(r: dict) -> str:
    """The figures, for people."""
    pd, mem = r["per_device"], r["per_device"]["compiled"]
    b, f, a = r["batch"], r["flops_per_step"], r["at_mfu"]
    p = r["params"]
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines = [
        f"lladav-plan: {r['config']} on {r['topology']} ({r['devices']} x {r['chip']}"
        f"{', ' + str(r['slices']) + ' slices' if r['slices'] > 1 else ''}); mesh {mesh}",
        f"compiled for: {r['compiled_for']}",
        f"  lowering {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s",
        f"parameters: {p['total'] / 1e9:.3f} B (text {p['text'] / 1e9:.3f} B, vision "
        f"{p['vision'] / 1e6:.1f} M, connector {p['connector'] / 1e6:.1f} M); "
        f"{pd['parameters_global'] / GIB:.2f} GiB in all",
        f"batch: {b['global_rows']} rows x {b['seq_len']} tokens, {b['tiles']} image tiles, "
        f"grad_accum {b['grad_accum']}",
        "per device (train step):",
        f"  parameters        {_gib(pd['parameters'])}  (analytic: each leaf / its shards)",
        f"  optimizer state   {_gib(pd['optimizer_state'])}  (analytic)",
        f"  batch             {_gib(pd['batch'])}",
        f"  compiled: arguments {_gib(mem['argument'])}, outputs {_gib(mem['output'])} "
        f"(aliased to donated inputs {_gib(mem['alias'])})",
        f"            temporaries (activations, gradients) {_gib(mem['temp'])}, "
        f"generated code {_gib(mem['generated_code'])}",
        f"  total             {_gib(mem['total'])}  (arguments + outputs - aliased + "
        "temporaries + code)",
        f"FLOPs per step: {f['analytic'] / 1e15:.3f} PFLOP (flops.flops_per_step), "
        f"{f['analytic_per_device'] / 1e12:.2f} TFLOP per device; XLA's count per device "
        + (f"{f['xla_per_device'] / 1e12:.2f} TFLOP (XLA counts a loop body once: the scanned "
           "layers and accumulation steps are under-counted)"
           if f["xla_per_device"] is not None else "n/a"),
        f"at MFU {a['mfu']:.0%} of {a['peak_tflops_per_chip']:.0f} TFLOP/s per chip: "
        f"{a['step_s']:.2f} s per step, {a['tokens_per_s_per_chip']:,.0f} tokens/s per chip "
        f"({a['tokens_per_s']:,.0f} in all; every position of the padded batch)",
        f"fits in HBM (keeping {r['hbm_margin']:.0%} free), {r['devices']} devices of:",
    ]
    for key, fit in r["fits"].items():
        mark = "yes" if fit["fits"] else "NO "
        lines.append(f"  {mark} {topo.CHIPS[key].name:22s} {fit['hbm_gib']:6.0f} GiB "
                     f"(usable {fit['usable_gib']:.1f})"
                     + ("   <- target" if key == r["family"] else ""))
    s = r.get("sampler")
    if s:
        sm = s["memory"]
        fits = ", ".join(topo.CHIPS[k].name for k, ok in s["fits"].items() if ok) or "none"
        lines += [
            f"sampler (inference): batch {s['batch']}, prompt {s['prompt_len']} + answer "
            f"{s['gen_length']} tokens, block {s['block_length']}, {s['steps']} steps, cache "
            f"{s['cache']}; compiled in {s['compile_s']:.1f} s",
            f"  per device: parameters {_gib(s['parameters_per_device'])}, temporaries "
            f"{_gib(sm['temp'])}, total {_gib(sm['total'])}; fits: {fits}",
        ]
    lines += [f"note: {n}" for n in r["notes"]]
    if r["compiled_for"].startswith("cpu ("):
        lines.append("note: memory from XLA:CPU's buffer assignment; the target compiler fuses, "
                     "lays out and rematerialises differently, so temporaries are an estimate "
                     "(parameters and optimizer state are exact)")
    return "\n".join(lines)
