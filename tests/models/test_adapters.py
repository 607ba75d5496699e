"""LoRA adapters and quantized weights in the model (models/dense.py, quant.py, adapters.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lladav_jax.models import adapters, lladav, quant, variants


def tiny(**sections):
    cfg = variants.model_config("tiny")
    for name, value in sections.items():
        cfg[name] = value
    return cfg


def build(cfg, params):
    graphdef, state = nnx.split(lladav.abstract(cfg))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def base():
    model = lladav.create(tiny(), seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 480, (2, 24)))
    return model, nnx.to_pure_dict(nnx.state(model, nnx.Param)), tokens


LORA = dict(rank=4, alpha=8.0, dropout=0.1, targets="q,v,down", vision_targets="q,fc2")


def test_fresh_adapters_compute_exactly_the_base_model(base):
    model, params, tokens = base
    cfg = tiny(lora=LORA)
    adapted = adapters.adapt(params, cfg, seed=3)
    names = {"/".join(k) for k in jax.tree_util.tree_flatten_with_path(
        adapters.adapters_of(adapted))[0] for k in [tuple(str(p.key) for p in k[0])]}
    assert names == {f"{part}/layers/{m}/lora_{x}" for part, ms in
                     (("llm", ("q", "v", "down")), ("vision", ("q", "fc2"))) for m in ms
                     for x in "ab"}
    assert adapted["llm"]["layers"]["q"]["lora_a"].shape == (2, 64, 4)  # stacked over layers
    assert np.array_equal(np.asarray(build(cfg, adapted)(tokens)), np.asarray(model(tokens)))


def test_trained_adapters_merge_into_the_plain_model(base):
    model, params, tokens = base
    cfg = tiny(lora=LORA)
    adapted = adapters.adapt(params, cfg, seed=3)
    key = iter(jax.random.split(jax.random.key(1), 16))
    adapted = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(key), x.shape)
        if str(p[-1].key) == "lora_b" else x, adapted)
    lora_model = build(cfg, adapted)
    merged = build(tiny(), adapters.merge(adapted, cfg))
    out = np.asarray(lora_model(tokens))
    assert np.abs(out - np.asarray(model(tokens))).max() > 1e-2  # the adapters do something
    np.testing.assert_allclose(np.asarray(merged(tokens)), out, atol=2e-5)
    # Dropout only with a key (training), and a different mask per key.
    drop = lambda k: np.asarray(lora_model(tokens, dropout_rng=jax.random.key(k)))
    assert not np.allclose(drop(0), out) and not np.allclose(drop(0), drop(1))


@pytest.mark.parametrize("fmt,close", [("int8", 0.02), ("int4", 0.3)])
def test_quantized_weights_stay_close_and_merge_back(base, fmt, close):
    model, params, tokens = base
    cfg = tiny(quantize=dict(weights=fmt, tile=32, vision=True))
    qparams = adapters.adapt(params, cfg)
    q = qparams["llm"]["layers"]["q"]
    assert q["qvalue"].dtype == quant.FORMATS[fmt] and "kernel" not in q
    assert q["qscale"].shape == ((2, 1, 64) if fmt == "int8" else (2, 2, 64))
    assert qparams["llm"]["embed"]["qvalue"].shape == (512, 64)
    qmodel = build(cfg, qparams)
    ref, out = np.asarray(model(tokens)), np.asarray(qmodel(tokens))
    assert 0 < np.abs(out - ref).max() < close * np.abs(ref).max()
    # The sampler's caches stay in the compute dtype.
    assert qmodel.llm.init_cache(1, 8)[0].dtype == jnp.float32
    merged = build(tiny(), adapters.merge(qparams, cfg))
    np.testing.assert_array_equal(np.asarray(merged(tokens)), out)


def test_int8_is_closer_than_int4():
    w = jax.random.normal(jax.random.key(0), (256, 128))
    err = {f: float(jnp.abs(quant.dequantize(*quant.quantize(w, f, 64), jnp.float32) - w).mean())
           for f in ("int8", "int4")}
    assert err["int8"] < err["int4"] / 8


@pytest.mark.parametrize("sections,message", [
    (dict(lora=dict(rank=4, targets="q,query")), "unknown ['query']"),
    (dict(quantize=dict(weights="nf4")), "quantize.weights 'nf4'"),
    (dict(quantize=dict(weights="int4", tile=48)), "quantize.tile 48 does not divide"),
])
def test_settings_the_model_cannot_take_are_named(sections, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lladav.abstract(tiny(**sections))
