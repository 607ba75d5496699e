"""lladav-plan: does a run fit a topology, and how fast could it go? Compiles, never allocates.

    lladav-plan --config configs/stage2a.py --topology v5p-64 [--devices N] [--mfu 0.45]
        [--hbm_margin 0.1] [--json plan.json] [--nosampler] [--config.data.seq_len=4096]

LoRA / QLoRA training (frozen base weights: no optimizer state, no gradients; int4 counted at
half a byte):

    lladav-plan --config configs/lora.py --topology v5e-1 --config.quantize.weights=int4

Inference alone, the weights stored as int8 / int4 (the sampler's weights, K/V cache and
temporaries for one prompt):

    lladav-plan --inference --quantize int8 --config configs/stage2a.py --topology v5e-1 \
        --prompt_len 1485 --gen_length 128

What is compiled and reported: `lladav_jax.scale.plan`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import flags
from ml_collections import config_flags

from lladav_jax.cli import errors
from lladav_jax.diffusion.options import CACHES
from lladav_jax.scale import topology as topo
from lladav_jax.scale.plan import (
    SamplerSpec,
    plan,
    plan_inference,
    use_simulated_cpu_devices,
)
from lladav_jax.scale.plan_report import report

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A training config, e.g. configs/stage2a.py.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, f"Target slice, e.g. {', '.join(topo.names())}. With mesh.slices = K, "
    "K such slices.")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "Devices to plan for (default: the topology's chips x mesh.slices).")
_SIMULATE = flags.DEFINE_boolean(
    "simulate", True, "Compile for the CPU with that many simulated devices. --nosimulate "
    "uses this machine's own devices and compiler (a TPU VM or GPU node with enough of them).")
_MFU = flags.DEFINE_float("mfu", 0.45, "Model FLOPs utilisation assumed for the step time.")
_MARGIN = flags.DEFINE_float(
    "hbm_margin", 0.1, "Share of HBM kept free (runtime reserve, compiler differences).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
_SAMPLER = flags.DEFINE_boolean("sampler", True, "Also compile the sampler (inference memory).")
_INFER_BATCH = flags.DEFINE_integer("infer_batch", 1, "Sampler: prompts decoded together.")
_PROMPT_LEN = flags.DEFINE_integer(
    "prompt_len", 0, "Sampler: prompt tokens (default: image.max_visual_tokens + 128, the "
    "largest AnyRes image with a short question).")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 128, "Sampler: answer tokens.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "Sampler: block length.")
_CACHE = flags.DEFINE_enum("cache", "dual", list(CACHES), "Sampler: KV cache.")
_INFERENCE = flags.DEFINE_boolean(
    "inference", False, "Plan inference alone: compile the sampler, not the train step.")
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "", ["", "none", "int8", "int4"], "Sampler: the weights' storage. int8 | int4: "
    "the plain model (adapters merged) quantized as `load_model(quantize=...)` loads it; none: "
    "the plain model in model.param_dtype; unset: the config's model as it is (a LoRA / QLoRA "
    "config's adapters and quantized base).")
errors.define_absl_debug_flag()

# Ranges, checked as the flags are parsed (absl: "flag --mfu=0.0: must be in (0, 1]").
flags.register_validator("mfu", lambda v: 0 < v <= 1, "must be in (0, 1]")
flags.register_validator("hbm_margin", lambda v: 0 <= v < 1, "must be in [0, 1)")
flags.register_validator("devices", lambda v: v is None or v >= 1, "must be >= 1")
for _name in ("gen_length", "block_length", "infer_batch"):
    flags.register_validator(_name, lambda v: v >= 1, "must be >= 1")
flags.register_validator("prompt_len", lambda v: v >= 0, "must be >= 0 (0: the default)")


def _run(argv: list[str]) -> int:
    del argv
    config = _CONFIG.value
    target = topo.parse(_TOPOLOGY.value)  # a TopologyError names the known ones
    n = _DEVICES.value or target.chips * int(config.mesh.get("slices", 1))
    if _SIMULATE.value:
        use_simulated_cpu_devices(n)
    import jax

    if _SIMULATE.value and jax.device_count() != n:
        raise RuntimeError(f"asked for {n} simulated CPU devices but JAX started with "
                           f"{jax.device_count()} (its backend was initialised before the "
                           "flag took)")
    spec = SamplerSpec(_INFER_BATCH.value, _PROMPT_LEN.value, _GEN_LENGTH.value,
                       _BLOCK_LENGTH.value, _CACHE.value)
    # A MeshError (a mesh that does not divide the model) is a ValueError: one line.
    if _INFERENCE.value:
        result = plan_inference(config, target, n, spec=spec, quantize=_QUANTIZE.value or None,
                                hbm_margin=_MARGIN.value)
    else:
        result = plan(config, target, n, mfu=_MFU.value, hbm_margin=_MARGIN.value,
                      sampler_spec=spec if _SAMPLER.value else None,
                      quantize=_QUANTIZE.value or None)
    print(report(result), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """argv as sys.argv (the program first); exits with the status, as absl's app.run did."""
    sys.exit(errors.run_absl("lladav-plan", _run, argv, required=("config", "topology")))


if __name__ == "__main__":
    main()
