"""SigLIPVision against transformers' SiglipVisionModel (tiny, random weights, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.models import hf_params
from lladav_jax.models.siglip import SigLIPVision
from lladav_jax.models.variants import model_config
from tests.close import assert_close


@pytest.fixture(scope="module")
def setup():
    cfg = model_config("tiny")
    hf = ref.randomize(transformers.SiglipVisionModel(ref.siglip_config(cfg)))
    ours = SigLIPVision(cfg, rngs=nnx.Rngs(0))
    sd = ref.state_dict(hf, prefix=hf_params.VISION_PREFIX)
    hf_params.load_hf(ours, sd, hf_params.vision_entries(cfg, root=()), cfg)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    want = out.hidden_states[-2].numpy()
    return cfg, ours, pixels, want


_check = assert_close


def test_matches_transformers(setup):
    _, ours, pixels, want = setup
    assert want.shape == (2, (56 // 14) ** 2, 32)
    _check(ours(jnp.asarray(pixels)), want)


def test_select_layer_drops_last_layer():
    cfg = model_config("tiny")
    assert (cfg.vision.num_layers, cfg.vision.select_layer) == (3, -2)
    model = SigLIPVision(cfg, rngs=nnx.Rngs(0))
    assert model.layers.q.kernel.shape == (2, 32, 32)
    assert model.layers.fc1.kernel.shape == (2, 32, 64)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any("post" in p or "head" in p for p in paths)


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_jit_and_remat(setup, remat_policy):
    cfg, ours, pixels, want = setup
    ours.remat_policy = remat_policy
    try:
        got = nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(pixels))
        _check(got, want)
        # Gradients go through the scan and the checkpointing.
        grad = nnx.grad(lambda m: jnp.mean(m(jnp.asarray(pixels)) ** 2))(ours)
        assert np.isfinite(np.asarray(jax.tree.leaves(grad)[0])).all()
    finally:
        ours.remat_policy = cfg.remat_policy
