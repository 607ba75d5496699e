"""`lladav-plan`'s figures for people: the text report of a `plan.plan` / `plan_inference`
result."""

from __future__ import annotations

from lladav_jax.scale import topology as topo
from lladav_jax.scale.memory import GIB


def _count(n: float) -> str:
    """A parameter count people read: 8.016 B, 42.5 M, 12.3 K."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3f} {unit}" if unit == "B" else f"{n / size:.1f} {unit}"
    return f"{n:.0f}"


def _gib(b: float) -> str:
    return f"{b / GIB:8.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:8.2f} MiB"


def _fit_lines(r: dict) -> list[str]:
    lines = [f"fits in HBM (keeping {r['hbm_margin']:.0%} free), {r['devices']} devices of:"]
    for key, fit in r["fits"].items():
        mark = "yes" if fit["fits"] else "NO "
        lines.append(f"  {mark} {topo.CHIPS[key].name:22s} {fit['hbm_gib']:6.0f} GiB "
                     f"(usable {fit['usable_gib']:.1f})"
                     + ("   <- target" if key == r["family"] else ""))
    return lines


def _sampler_lines(s: dict) -> list[str]:
    sm = s["memory"]
    weights = s["weights"] if s["weights"] != "none" else s["param_dtype"]
    return [
        f"  batch {s['batch']}, prompt {s['prompt_len']} + answer {s['gen_length']} tokens, "
        f"block {s['block_length']}, {s['steps']} steps, cache {s['cache']}; weights "
        f"{weights}, compute {s['dtype']}; compiled in {s['compile_s']:.1f} s",
        f"  weights           {_gib(s['parameters_per_device'])}  per device (analytic; "
        f"quantized {_gib(s['quantized_per_device']).strip()} at their stored size, the rest "
        f"in {s['param_dtype']})",
        f"  K/V cache         {_gib(s['kv_cache'])}  (analytic, whole, in {s['dtype']}; part "
        "of the temporaries)",
        f"  temporaries       {_gib(sm['temp'])}  (cache, activations, logits)",
        f"  total             {_gib(sm['total'])}  per device (arguments + outputs - aliased + "
        "temporaries + code)",
    ]


def _cpu_note(r: dict) -> list[str]:
    if not r["compiled_for"].startswith("cpu ("):
        return []
    return ["note: memory from XLA:CPU's buffer assignment; the target compiler fuses, lays "
            "out and rematerialises differently, so temporaries are an estimate (parameters, "
            "optimizer state, gradients and the cache are exact); compiled without XLA's "
            "while-loop-invariant-code-motion, which on the CPU hoists a float32 copy of every "
            "layer's bf16 / int weights out of the layer scan (a TPU or GPU multiplies them "
            "as stored)"]


def _header(r: dict) -> list[str]:
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    p = r["params"]
    return [
        f"lladav-plan: {r['config']}{' inference' if r['mode'] == 'inference' else ''} on "
        f"{r['topology']} ({r['devices']} x {r['chip']}"
        f"{', ' + str(r['slices']) + ' slices' if r['slices'] > 1 else ''}); mesh {mesh}",
        f"compiled for: {r['compiled_for']}",
        f"parameters: {_count(p['total'])} (text {_count(p['text'])}, vision "
        f"{_count(p['vision'])}, connector {_count(p['connector'])})",
    ]


def report(r: dict) -> str:
    """The figures, for people."""
    if r.get("mode") == "inference":
        lines = [*_header(r), "sampler (inference), per device:", *_sampler_lines(r["sampler"]),
                 *_fit_lines(r)]
        return "\n".join(lines + [f"note: {n}" for n in r["notes"]] + _cpu_note(r))
    pd, mem = r["per_device"], r["per_device"]["compiled"]
    b, f, a, ad = r["batch"], r["flops_per_step"], r["at_mfu"], r["adapters"]
    if ad["rank"]:
        trains = (f"LoRA rank {ad['rank']} on {','.join(ad['targets']) or '-'}"
                  + (f" (vision: {','.join(ad['vision_targets'])})" if ad["vision_targets"]
                     else "")
                  + (f", base weights {ad['weights']}" if ad["weights"] != "none" else "")
                  + f": {_count(r['params']['trained'])} parameters train (adapters and "
                  "any part trained whole), the base is frozen")
    else:
        trains = f"{_count(r['params']['trained'])} parameters train"
    lines = [
        *_header(r),
        f"  lowering {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s",
        f"{trains}; {pd['parameters_global'] / GIB:.2f} GiB of parameters in all",
        f"batch: {b['global_rows']} rows x {b['seq_len']} tokens, {b['tiles']} image tiles, "
        f"grad_accum {b['grad_accum']}",
        "per device (train step):",
        f"  parameters        {_gib(pd['parameters'])}  (analytic: each leaf / its shards)",
        f"    trained         {_gib(pd['parameters_trained'])}",
        f"    frozen          {_gib(pd['parameters_frozen'])}  (no optimizer state, no "
        f"gradients; quantized {_gib(pd['parameters_quantized']).strip()} at their stored "
        "size)",
        f"  optimizer state   {_gib(pd['optimizer_state'])}  (analytic: the trained "
        "parameters' Adam moments)",
        f"  gradients         {_gib(pd['gradients'])}  (analytic: the trained parameters"
        f"{', x2 for the accumulation' if b['grad_accum'] > 1 else ''}; in the temporaries)",
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
        *_fit_lines(r),
    ]
    s = r.get("sampler")
    if s:
        fits = ", ".join(topo.CHIPS[k].name for k, ok in s["fits"].items() if ok) or "none"
        lines += ["sampler (inference), per device:", *_sampler_lines(s), f"  fits: {fits}"]
    return "\n".join(lines + [f"note: {n}" for n in r["notes"]] + _cpu_note(r))
