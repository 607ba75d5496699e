"""SigLIPVision against transformers' SiglipVisionModel (tiny, random weights, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lladav_jax.models.siglip import SigLIPVision
from lladav_jax.models.variants import model_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_model(vision):
    config = transformers.SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        intermediate_size=vision.intermediate_size,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=vision.layer_norm_eps,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random everything, norms away from 1/0, so a missing norm or bias shows.
            base = 1.0 if "layer_norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return model


def _copy_weights(ours: SigLIPVision, hf) -> None:
    """HF SigLIP -> ours: Linear [out,in] -> [in,out], conv OIHW -> HWIO, layers stacked."""
    # transformers 5 drops the `vision_model.` prefix of older versions; accept both.
    sd = {k.removeprefix("vision_model."): v.numpy() for k, v in hf.state_dict().items()}
    emb = "embeddings."
    ours.patch_embed.kernel[...] = sd[emb + "patch_embedding.weight"].transpose(2, 3, 1, 0)
    ours.patch_embed.bias[...] = sd[emb + "patch_embedding.bias"]
    ours.pos_embed[...] = sd[emb + "position_embedding.weight"]
    n = ours.layers.q.kernel.shape[0]
    stack = lambda name: np.stack([sd[f"encoder.layers.{i}.{name}"] for i in range(n)])
    names = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    }
    for ours_name, hf_name in names.items():
        lin = getattr(ours.layers, ours_name)
        lin.kernel[...] = stack(hf_name + ".weight").transpose(0, 2, 1)
        lin.bias[...] = stack(hf_name + ".bias")
    for ours_name, hf_name in {"ln1": "layer_norm1", "ln2": "layer_norm2"}.items():
        ln = getattr(ours.layers, ours_name)
        ln.scale[...] = stack(hf_name + ".weight")
        ln.bias[...] = stack(hf_name + ".bias")


@pytest.fixture(scope="module")
def setup():
    cfg = model_config("tiny")
    hf = _hf_model(cfg.vision)
    ours = SigLIPVision(cfg, rngs=nnx.Rngs(0))
    _copy_weights(ours, hf)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    want = out.hidden_states[-2].numpy()
    return cfg, ours, pixels, want


def _check(got, want):
    assert got.shape == want.shape
    tol = 1e-5 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol)


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
