"""lladav-plan: topologies, per-device bytes against an independent count, compiling without
allocating, clear mesh errors, the CLI end to end, and the scan keeping the program size flat."""

import gc
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lladav_jax.models import flops, lladav
from lladav_jax.models.config import ModelConfig
from lladav_jax.scale import memory, plan, plan_report, sharding, topology
from lladav_jax.train import metrics
from lladav_jax.train.defaults import base_config, sft_8b

MESH = dict(data=2, fsdp=2, tensor=2, slices=1)


def tiny_config(**lrs):
    c = base_config("tiny")
    c.data.seq_len, c.data.batch_size = 64, 8
    c.mesh.update(MESH)
    if lrs:
        c.optim.lr.update(lrs)
    return c


def expected_param_bytes(cfg, mesh_shape: dict, parts=None) -> tuple[int, int]:
    """(per-device bytes, global bytes) of the parameters (of `parts` only, if given), from
    each parameter's logical axes mapped by the default rules: its bytes divided by the
    product of the mesh axes it is split over (the tiny shapes divide evenly)."""
    rules = dict(sharding.DEFAULT_RULES)
    per_device = total = 0
    state = nnx.state(lladav.abstract(cfg), nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if parts is not None and path[0] not in parts:
            continue
        value = var.get_raw_value()  # a ShapeDtypeStruct
        nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
        shards = 1
        for name, dim in zip(var.get_metadata()["out_sharding"], value.shape, strict=True):
            axes = rules.get(name) if name else None
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            size = math.prod(mesh_shape[a] for a in axes)
            assert dim % size == 0, (path, value.shape)
            shards *= size
        per_device += nbytes // shards
        total += nbytes
    return per_device, total


def test_topologies():
    assert topology.parse("v5p-64").chips == 32  # v5p names count TensorCores
    assert topology.parse("v4-8").chips == 4
    assert topology.parse("v6e-256").chips == 256
    assert topology.parse("v5litepod-16").chips == 16
    assert topology.parse("v5e-16").chip.hbm_gib == 16
    assert topology.parse("H100x8").chips == 8
    assert topology.parse("h200x16").chip.hbm_gib == 141
    for bad in ("v5p-12", "v6e-3", "tpu-8", "v5p-64x"):
        with pytest.raises(topology.TopologyError):
            topology.parse(bad)
    # The training MFU uses the same records, looked up by the device kind jax reports.
    for chip in topology.CHIPS.values():
        assert topology.chip_for_device_kind(chip.device_kind) is chip, chip
    for kind, tflops in {"TPU v5e": 197.0, "TPU v5 lite": 197.0, "TPU v6e": 918.0,
                         "NVIDIA H100 PCIe": 989.0, "NVIDIA A100-SXM4-40GB": 312.0}.items():
        assert topology.chip_for_device_kind(kind).peak_tflops == tflops, kind
    assert topology.chip_for_device_kind("cpu") is None


def test_mfu_peak_per_device(monkeypatch):
    """Configured, else the chip's datasheet peak by device kind, else measured (the CPU)."""
    assert metrics.peak_flops_per_device(2.5) == 2.5e12
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda: 123.0)
    assert metrics.peak_flops_per_device() == 123.0  # this machine's CPU
    monkeypatch.setattr(jax, "devices", lambda *a: [type("D", (), {"device_kind": "TPU v5p"})])
    assert metrics.peak_flops_per_device() == topology.parse("v5p-8").peak_flops == 459e12


@pytest.fixture(scope="module")
def tiny_plan():
    cfg = tiny_config()
    gc.collect()  # arrays of earlier tests, freed during the plan, would count as negative
    before = jax.live_arrays()  # held, so that their ids stay theirs
    known = {id(x) for x in before}
    result = plan.plan(cfg, topology.parse("v5p-16"), 8)
    return cfg, result, len([x for x in jax.live_arrays() if id(x) not in known])


@pytest.mark.slow
def test_bytes_per_device_match_the_shardings(tiny_plan):
    cfg, r, _ = tiny_plan
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    per_device, total = expected_param_bytes(cfg.model, r["mesh"])
    assert total == 4 * lladav.param_counts(cfg.model)["total"]  # float32
    assert r["per_device"]["parameters"] == per_device
    assert r["per_device"]["parameters_global"] == total
    # Everything trains: Adam's two moments per parameter, plus scalar step counts.
    opt = r["per_device"]["optimizer_state"]
    assert 0 <= opt - 2 * per_device <= 4 * 8 and (opt - 2 * per_device) % 4 == 0
    mem = r["per_device"]["compiled"]
    # The compiled step takes parameters, optimizer state and batch as arguments.
    args = per_device + opt + r["per_device"]["batch"]
    assert args <= mem["argument"] <= args + 1024
    assert mem["alias"] > 0  # the donated state is written in place
    assert mem["temp"] > 0 and mem["total"] > mem["argument"]
    assert r["flops_per_step"]["analytic"] == flops.flops_per_step(
        cfg.model, (8, 64), 8 * cfg.model.image.max_tiles)
    assert r["flops_per_step"]["xla_per_device"] > 0
    assert r["compiled_for"].startswith("cpu (8 simulated devices")
    assert r["fits_target"] and r["at_mfu"]["step_s"] > 0


@pytest.mark.slow
def test_compile_allocates_nothing(tiny_plan):
    assert tiny_plan[2] == 0


@pytest.mark.slow
def test_frozen_parts_have_no_optimizer_state():
    cfg = tiny_config(vision=0.0, llm=0.0)  # stage 1: the connector alone trains
    r = plan.plan(cfg, topology.parse("v5p-16"), 8)
    params, _ = expected_param_bytes(cfg.model, r["mesh"])
    connector, _ = expected_param_bytes(cfg.model, r["mesh"], {"connector", "image_newline"})
    assert r["per_device"]["parameters"] == params
    opt = r["per_device"]["optimizer_state"]
    assert 0 <= opt - 2 * connector <= 4 * 8


def test_mesh_that_does_not_fit_is_named():
    cfg = tiny_config()
    cfg.mesh.update(dict(data=3, fsdp=-1, tensor=1))
    with pytest.raises(sharding.MeshError, match="does not divide the 8 devices"):
        plan.plan(cfg, topology.parse("v5p-16"), 8)
    cfg.mesh.update(dict(data=1, fsdp=8, tensor=1))
    cfg.data.batch_size = 12
    with pytest.raises(sharding.MeshError, match="multiple of data x fsdp = 8"):
        plan.plan(cfg, topology.parse("v5p-16"), 8)
    cfg.mesh.update(dict(data=1, fsdp=-1, tensor=1, slices=2))  # 2 slices need data >= 2
    with pytest.raises(sharding.MeshError, match="not a multiple of slices=2"):
        plan.plan(cfg, topology.parse("v5e-4"), 8)
    cfg = tiny_config()
    cfg.mesh.update(dict(data=1, fsdp=8, tensor=1))
    cfg.model.vision.hidden_size = 36  # SigLIP's 1152 on 256 devices, in small
    with pytest.raises(sharding.MeshError,
                       match=r"vision\.layers\.fc1\.kernel \(2, 36, 64\): dimension 1 \(36\) over "
                             r"fsdp \(8\).*fsdp must divide 4;"):
        plan.plan(cfg, topology.parse("v5p-16"), 8)
    with pytest.raises(sharding.MeshError, match="this process has 8"):
        plan.plan(tiny_config(), topology.parse("v5p-64"))


def test_program_size_does_not_grow_with_depth():
    """The text layers run in a scan: 8 layers lower to (nearly) the program of 2."""
    sizes = {}
    mesh = sharding.make_mesh(MESH)
    for layers in (2, 8):
        cfg = tiny_config()
        cfg.model.text.num_layers = layers
        lowered, *_ = plan.lower_train_step(cfg, mesh)
        sizes[layers] = len(lowered.as_text())
    assert sizes[2] > 10_000
    assert abs(sizes[8] - sizes[2]) / sizes[2] < 0.01, sizes


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    config = tmp_path / "tiny_plan.py"
    config.write_text(textwrap.dedent("""
        from lladav_jax.train.defaults import base_config

        def get_config():
            c = base_config("tiny")
            c.data.seq_len, c.data.batch_size = 64, 8
            return c
    """))
    out = tmp_path / "plan.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run(
        [sys.executable, "-m", "lladav_jax.cli.plan", f"--config={config}", "--topology=v6e-4",
         "--devices=8", "--config.mesh.tensor=2", "--config.mesh.data=2",
         "--config.mesh.slices=2", f"--json={out}", "--gen_length=32"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    # The CLI sets the device count itself (the inherited XLA_FLAGS said 2).
    assert "compiled for: cpu (8 simulated devices; TPU v6e compiler not available" in text
    assert "(8 x TPU v6e, 2 slices); mesh data 2 x fsdp 2 x tensor 2" in text
    for line in ("parameters ", "optimizer state", "temporaries", "FLOPs per step",
                 "tokens/s per chip", "<- target", "sampler (inference)"):
        assert line in text, line
    r = json.loads(out.read_text())
    per_device, _ = expected_param_bytes(base_config("tiny").model, r["mesh"])
    assert r["per_device"]["parameters"] == per_device
    assert r["sampler"]["parameters_per_device"] == per_device
    assert r["sampler"]["memory"]["total"] > 0 and r["sampler"]["gen_length"] == 32


# LoRA, QLoRA and quantized inference. The 8b figures below are the analytic part of a plan
# (`state_bytes`, `inference_weight_bytes`: shapes and shardings only, seconds); the compiled
# plans run on a tiny model.


def one_chip_8b(rank: int = 0, weights: str = "none"):
    """The 8b SFT config on one chip: bf16 storage and compute, LoRA rank / base format."""
    c = sft_8b()
    c.model.param_dtype = "bfloat16"
    c.lora.rank, c.quantize.weights = rank, weights
    return c


@pytest.fixture(scope="module")
def one_device_mesh():
    return sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), jax.devices()[:1])


def test_int4_counts_half_a_byte():
    """numpy says an int4 takes a byte; XLA packs two a byte, and so does the plan."""
    assert np.dtype(jnp.int4).itemsize == 1
    assert memory.nbytes((1024, 1024), jnp.int4) == 512 * 1024
    assert memory.nbytes((3,), jnp.int4) == 2 and memory.nbytes((4, 8), jnp.bfloat16) == 64
    x = jax.ShapeDtypeStruct((1024, 1024), jnp.int4)
    compiled = jax.jit(lambda q: q.astype(jnp.float32).sum()).lower(x).compile()
    assert compiled.memory_analysis().argument_size_in_bytes == memory.nbytes(x.shape, x.dtype)


def test_lora_8b_frozen_base_has_no_optimizer_state(one_device_mesh):
    full = plan.state_bytes(one_chip_8b(), one_device_mesh)
    lora = plan.state_bytes(one_chip_8b(16), one_device_mesh)
    # Full fine-tuning trains every part (sft_8b); LoRA the adapters (float32) and connector.
    assert full["parameters_frozen"] == 0
    assert full["optimizer_state"] >= 2 * full["parameters_trained"]
    # The base weights are frozen: no moments, no gradients. Rank 16 on the 7 projections of
    # 32 layers is 42 M float32 parameters, plus the 21.5 M-parameter connector.
    assert lora["parameters_frozen"] > 0.98 * full["parameters"]
    assert lora["optimizer_state"] < 0.02 * full["optimizer_state"]  # the issue: < 5%
    assert 0 <= lora["optimizer_state"] - 2 * lora["parameters_trained"] <= 4 * 8
    assert lora["gradients"] == 2 * lora["parameters_trained"]  # grad_accum 8: the running sum
    assert lora["parameters"] - full["parameters"] < 0.2 * 2**30  # adapters: ~0.16 GiB


def test_qlora_8b_weights_at_their_stored_size(one_device_mesh):
    lora = plan.state_bytes(one_chip_8b(16), one_device_mesh)
    int8 = plan.state_bytes(one_chip_8b(16, "int8"), one_device_mesh)
    int4 = plan.state_bytes(one_chip_8b(16, "int4"), one_device_mesh)
    assert int4["parameters"] < int8["parameters"] < lora["parameters"]
    # The same adapters and connector train; only the frozen base's storage changes.
    assert int4["optimizer_state"] == int8["optimizer_state"] == lora["optimizer_state"]
    # int8: a byte per weight (and one bf16 scale per output channel); int4: half a byte (and
    # one bf16 scale per 128 inputs), so int4's quantized bytes are a bit over half of int8's.
    assert 0.5 < int4["parameters_quantized"] / int8["parameters_quantized"] < 0.53
    assert int8["parameters_quantized"] < 0.52 * lora["parameters_frozen"]


def test_quantize_without_lora_is_refused(one_device_mesh):
    with pytest.raises(ValueError, match=r"without LoRA.*--inference --quantize int4"):
        plan.state_bytes(one_chip_8b(0, "int4"), one_device_mesh)


def test_inference_8b_weights(one_device_mesh):
    cfg = one_chip_8b(16, "int4")  # a QLoRA config: --quantize takes the plain model's weights
    bf16 = plan.inference_weight_bytes(cfg, one_device_mesh, "none")
    int8 = plan.inference_weight_bytes(cfg, one_device_mesh, "int8")
    int4 = plan.inference_weight_bytes(cfg, one_device_mesh, "int4")
    assert bf16["quantized"] == 0
    plain = ModelConfig.from_config(cfg.model).plain()
    assert bf16["parameters"] == 2 * lladav.param_counts(plain)["total"]
    assert int4["parameters"] < int8["parameters"] < 0.55 * bf16["parameters"]
    own = plan.inference_weight_bytes(cfg, one_device_mesh)  # the config's model: int4 + LoRA
    assert own["quantized"] == int4["quantized"] and own["parameters"] > int4["parameters"]


def small_image_config(rank: int = 0, weights: str = "none"):
    """tiny with one small tile per image (a short compile), bf16 storage, one device."""
    c = base_config("tiny")
    c.model.image.update(aspect_ratio="plain", max_tiles=1, max_visual_tokens=16)
    c.model.param_dtype = "bfloat16"
    c.data.seq_len, c.data.batch_size = 64, 2
    c.train.grad_accum = 2
    c.lora.rank, c.quantize.weights = rank, weights
    return c


@pytest.mark.slow
def test_qlora_plan_compiled():
    """A QLoRA train step compiles against its abstract state; XLA's argument bytes agree with
    the analytic count, int4 weights included (packed two a byte)."""
    r = plan.plan(small_image_config(4, "int4"), topology.parse("v5e-1"), 1)
    pd, mem = r["per_device"], r["per_device"]["compiled"]
    assert r["mode"] == "train" and r["adapters"]["rank"] == 4
    assert pd["parameters_quantized"] > 0 and pd["parameters_frozen"] > pd["parameters_trained"]
    assert 0 <= pd["optimizer_state"] - 2 * pd["parameters_trained"] <= 4 * 8
    args = pd["parameters"] + pd["optimizer_state"] + pd["batch"]
    assert args <= mem["argument"] <= args + 1024
    assert r["fits_target"] and r["params"]["trained"] < r["params"]["total"]
    text = plan_report.report(r)
    for line in ("LoRA rank 4 on q,k,v,o,gate,up,down, base weights int4", "frozen ",
                 "gradients ", "<- target", "while-loop-invariant-code-motion"):
        assert line in text, line


def test_inference_plan_compiled():
    """The sampler alone, weights int8: the analytic weights and cache, the program's memory,
    whether it fits."""
    cfg = small_image_config()
    spec = plan.SamplerSpec(prompt_len=48, gen_length=32)
    r = plan.plan_inference(cfg, topology.parse("v5e-1"), 1, spec=spec, quantize="int8")
    s = r["sampler"]
    assert r["mode"] == "inference" and s["weights"] == "int8"
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), jax.devices()[:1])
    weights = plan.inference_weight_bytes(cfg, mesh, "int8")
    assert s["parameters_per_device"] == weights["parameters"] > weights["quantized"] > 0
    t = cfg.model.text  # K and V, every layer, prompt + answer, float32 compute
    assert s["kv_cache"] == 2 * t.num_layers * (48 + 32) * t.num_kv_heads * t.head_dim * 4
    assert s["memory"]["argument"] >= weights["parameters"]
    assert r["fits_target"] and r["fits"]["v5e"]["fits"]
    text = plan_report.report(r)
    assert "tiny inference on v5e-1" in text and "weights int8" in text and "K/V cache" in text
