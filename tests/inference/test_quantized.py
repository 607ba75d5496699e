"""Weight-only quantized inference: `lladav_jax.load(DIR, quantize=...)` and `--quantize` on
lladav-generate and lladav-eval, on the tiny random model of test_generate_api; and what an 8b
model's weights weigh quantized, counted on the abstract model (no memory)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lladav_jax.checkpoints import modeldir
from lladav_jax.cli import eval as eval_cli
from lladav_jax.cli import generate
from lladav_jax.inference import api
from lladav_jax.models import lladav, variants
from lladav_jax.models.config import WEIGHT_FORMATS
from lladav_jax.models.dense import QuantizedParam
from tests.cli.test_commands import _exit_status, _one_error_line
from tests.inference import test_generate_api as generate_api

FAST = generate_api.FAST
dirs = generate_api.dirs  # the same tiny model directory and workdir (a module fixture)


def _tokens() -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 24)), jnp.int32)


def _logits(m: api.Model) -> np.ndarray:
    return np.asarray(m.module(tokens=_tokens()), np.float32)


def _quantized_paths(m: api.Model) -> list[str]:
    state = nnx.state(m.module, QuantizedParam)
    return [".".join(map(str, path)) for path, _ in nnx.to_flat_state(state)]


@pytest.fixture(scope="module")
def models(dirs):
    return {q: api.load(dirs["model"], quantize=q) for q in (None, "int8", "int4")}


def test_logits_close_to_float_int8_closer(models):
    """Quantization error on the logits, relative to their spread (root mean square): small
    for int8, about 16x larger for int4 (7 levels a side instead of 127)."""
    base = _logits(models[None])
    rel = {q: np.sqrt(np.mean((_logits(models[q]) - base) ** 2)) / base.std()
           for q in ("int8", "int4")}
    print(f"rms logit error / logit std: int8 {rel['int8']:.4f}, int4 {rel['int4']:.4f}")
    assert rel["int8"] < 0.02
    assert rel["int4"] < 0.3
    assert rel["int8"] < rel["int4"] / 8
    # Both still pick mostly the float model's token.
    top = base.argmax(-1)
    assert (_logits(models["int8"]).argmax(-1) == top).mean() > 0.9
    # The language model, head and embedding are quantized; the vision tower by default not.
    paths = _quantized_paths(models["int8"])
    assert any(p.startswith("llm.embed") for p in paths)
    assert any(p.startswith("llm.lm_head") for p in paths)
    assert any(p.startswith("llm.layers") for p in paths)
    assert not any(p.startswith("vision") for p in paths)
    assert models["int4"].config.quantize.weights == "int4"
    assert api.weight_bytes(models["int4"].module) < api.weight_bytes(models["int8"].module) < (
        api.weight_bytes(models[None].module))


def test_quantize_vision(dirs):
    m = api.load(dirs["model"], quantize="int8", quantize_vision=True)
    assert any(p.startswith("vision") for p in _quantized_paths(m))
    assert m.config.quantize.vision


def test_caches_stay_in_the_compute_dtype(dirs, tmp_path):
    """Under int8 the embedding's output, and so the sampler's K/V caches (made in the prompt
    embeddings' dtype), are in the compute dtype, not the weights' storage dtype."""
    cfg = variants.model_config("tiny")
    cfg.dtype = "bfloat16"  # compute in bfloat16 over float32 weights: three dtypes in play
    path = modeldir.save_model_dir(tmp_path / "bf16", lladav.create(cfg, seed=3), cfg,
                                   tokenizer_dir=dirs["model"])
    m = api.load(path, quantize="int8")
    llm = m.module.llm
    assert llm.embed.qvalue[...].dtype == jnp.int8
    assert llm.embed(_tokens()).dtype == jnp.bfloat16
    k, v = llm.init_cache(1, 8)
    assert k.dtype == v.dtype == jnp.bfloat16
    # The cached samplers run: the prompt's K/V written into the cache in that dtype.
    for cache in ("prefix", "dual"):
        assert len(m.generate(None, "Hi?", cache=cache, return_details=True, **FAST).tokens) == 8


def test_generate_cli_quantized(dirs, capsys):
    argv = ["--ckpt", str(dirs["work"]), "--prompt", "What is this?", "--output_ids",
            *(f"--{k}={v}" for k, v in FAST.items())]
    for q in ("int8", "int4"):
        assert generate.main([*argv, "--quantize", q, "--quantize_tile", "32"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out["tokens"]) == FAST["gen_length"]


def test_eval_cli_quantized(dirs, tmp_path, capsys):
    png = tmp_path / "a.png"
    png.write_bytes(generate_api._png(0))
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"image": str(png), "question": "Color?", "answer": "red"}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["--ckpt", str(dirs["model"]), "--data", str(data), "--out", str(out),
            "--quantize", "int8", "--quantize_vision", *(f"--{k}={v}" for k, v in FAST.items())]
    assert eval_cli.main(argv) == 0
    assert "accuracy:" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 1


def test_a_tile_the_model_cannot_take(dirs, tmp_path, capsys):
    """An int4 tile that does not divide a quantized layer's input width (the tiny model's are
    64 and 128): one error line naming it, exit 1, nothing written."""
    with pytest.raises(ValueError, match="quantize_tile=48"):
        api.load(dirs["model"], quantize="int4", quantize_tile=48)
    png = tmp_path / "order.png"
    assert generate.main(["--ckpt", str(dirs["model"]), "--prompt", "q", "--quantize", "int4",
                          "--quantize_tile", "48", "--order_png", str(png)]) == 1
    _one_error_line(capsys.readouterr().err, "lladav-generate", "quantize_tile=48", "64")
    image = tmp_path / "a.png"
    image.write_bytes(generate_api._png(0))
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"image": str(image), "question": "Color?", "answer": "red"})
                    + "\n")
    out = tmp_path / "out.jsonl"
    assert eval_cli.main(["--ckpt", str(dirs["model"]), "--data", str(data), "--out", str(out),
                          "--quantize", "int4", "--quantize_tile", "48"]) == 1
    _one_error_line(capsys.readouterr().err, "lladav-eval", "quantize_tile=48")
    assert not out.exists() and not png.exists()
    # int8 keeps one scale per output channel: the tile plays no part, any value loads.
    api.load(dirs["model"], quantize="int8", quantize_tile=48)


def test_bad_settings_are_refused_before_loading(tmp_path, capsys):
    """An unknown format or a tile below 1 is a usage error (exit 2, like every flag out of its
    range) found before any model is looked for; the API raises a ValueError naming it."""
    base = ["--ckpt", str(tmp_path / "none"), "--prompt", "q"]
    cases = [(["--quantize", "int3"], ["--quantize", "int3"]),
             (["--quantize", "int4", "--quantize_tile", "0"], ["--quantize_tile=0", ">= 1"]),
             (["--quantize_vision"], ["--quantize_vision", "--quantize"])]
    for argv, words in cases:
        assert _exit_status(generate.main, [*base, *argv]) == 2
        _one_error_line(capsys.readouterr().err, "lladav-generate", *words)
    for kwargs, word in ((dict(quantize="int3"), "'int3'"),
                         (dict(quantize="int4", quantize_tile=0), "quantize_tile 0")):
        with pytest.raises(ValueError, match=word):
            api.load(tmp_path / "none", **kwargs)
    assert generate.QUANTIZE_FORMATS == WEIGHT_FORMATS


@pytest.mark.parametrize(("fmt", "limit"), [("int8", 9e9), ("int4", 5.5e9)])
def test_8b_weight_bytes(fmt, limit):
    """The 8b model (bfloat16) quantized: int8 holds at most 9 GB of weights (one chip of 16 GB
    keeps room for activations and caches), int4 about half again. Counted on the abstract
    model: shapes and dtypes only."""
    cfg = variants.model_config("8b")
    cfg.dtype = cfg.param_dtype = "bfloat16"
    plain = api.weight_bytes(lladav.abstract(cfg))
    cfg.quantize = dict(weights=fmt, tile=128, vision=False)
    quantized = api.weight_bytes(lladav.abstract(cfg))
    print(f"8b weights: bfloat16 {plain / 1e9:.2f} GB, {fmt} {quantized / 1e9:.2f} GB "
          f"({quantized / plain:.3f}x)")
    assert quantized <= limit
