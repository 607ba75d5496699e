"""The HF weight table both ways: exact round trip, dtype casts, stored extras, named errors."""

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from lladav_jax.models import hf_params, lladav, variants

CFG = variants.model_config("tiny")
ENTRIES = hf_params.lladav_entries(CFG)


def params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_round_trip_is_exact_and_copies():
    a, b = lladav.create(CFG, seed=1), lladav.create(CFG, seed=2)
    sd = {k: np.array(v) for k, v in hf_params.export_hf(a, ENTRIES).items()}  # writable
    assert len(sd) == len({k for e in ENTRIES for k in e.hf_keys()})
    hf_params.load_hf(b, sd, ENTRIES, CFG)
    for x, y in zip(jax.tree.leaves(params(a)), jax.tree.leaves(params(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    sd["model.image_newline"][...] = 0  # the model holds its own copy, not the caller's array
    assert np.abs(np.asarray(b.image_newline[...])).max() > 0


@pytest.mark.slow
def test_bf16_tensors_load_into_float32_params():
    model = lladav.create(CFG)
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_params.export_hf(model, ENTRIES).items()}
    hf_params.load_hf(model, sd, ENTRIES, CFG)
    q = model.llm.layers.q.kernel[...]
    assert q.dtype == np.float32
    want = sd["model.layers.1.self_attn.q_proj.weight"].astype(np.float32).T
    np.testing.assert_array_equal(np.asarray(q[1]), want)


@pytest.mark.slow
def test_stored_extras_are_ignored():
    """A release holds the 27th vision layer, post_layernorm and the pooling head: not errors."""
    model = lladav.create(CFG)
    sd = hf_params.export_hf(model, ENTRIES)
    extra = {
        hf_params.VISION_PREFIX + "encoder.layers.2.mlp.fc1.weight": np.zeros((64, 32), np.float32),
        hf_params.VISION_PREFIX + "post_layernorm.weight": np.ones(32, np.float32),
        hf_params.VISION_PREFIX + "head.probe": np.zeros((1, 1, 32), np.float32),
    }
    hf_params.load_hf(model, {**sd, **extra}, ENTRIES, CFG)


@pytest.mark.slow
def test_errors_name_every_offending_key():
    model = lladav.create(CFG)
    sd = hf_params.export_hf(model, ENTRIES)
    before = params(model)
    sd["model.layers.0.mlp.up_proj.weights"] = sd.pop("model.layers.0.mlp.up_proj.weight")
    sd["model.mm_projector.2.bias"] = np.zeros(7, np.float32)
    with pytest.raises(hf_params.WeightMappingError) as err:
        hf_params.load_hf(model, sd, ENTRIES, CFG)
    msg = str(err.value)
    assert "missing keys (1): model.layers.0.mlp.up_proj.weight" in msg
    assert "unexpected keys (1): model.layers.0.mlp.up_proj.weights" in msg
    assert "model.mm_projector.2.bias: stored (7,), expected (64,)" in msg
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params(model)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # nothing written


def test_onevision_names():
    assert hf_params.llava_onevision_key("model.layers.3.mlp.up_proj.weight") == (
        "model.language_model.layers.3.mlp.up_proj.weight")
    assert hf_params.llava_onevision_key("model.mm_projector.2.bias") == (
        "model.multi_modal_projector.linear_2.bias")
    assert hf_params.llava_onevision_key(hf_params.VISION_PREFIX + "post_layernorm.bias") == (
        "model.vision_tower.post_layernorm.bias")
