"""`model.init`: how the linear layers' kernels are drawn (`official` N(0, 0.02), the released
configs' initializer_range; `fan_in` N(0, 1/d_in), for small models trained from scratch), and
the vision tower's position embedding (SigLIP's N(0, 1/width); N(0, 1) under `fan_in`)."""

import numpy as np
import pytest
from flax import nnx

from lladav_jax.models import variants
from lladav_jax.models.config import ModelConfig
from lladav_jax.models.dense import Dense
from lladav_jax.models.lladav import LLaDAV


def _model(init: str | None) -> LLaDAV:
    cfg = variants.model_config("tiny")
    if init is not None:
        cfg.init = init
    return LLaDAV(cfg, rngs=nnx.Rngs(0))


def _kernels(model: LLaDAV) -> dict[str, np.ndarray]:
    """Every linear layer's kernel ([..., d_in, d_out]; the layers' stacks lead) by path."""
    return {"/".join(map(str, path)): np.asarray(node.kernel[...])
            for path, node in nnx.iter_graph(model) if isinstance(node, Dense)}


@pytest.mark.parametrize("init", ["official", "fan_in"])
def test_kernels_have_the_init_std(init):
    kernels = _kernels(_model(init))
    # The text model's q/k/v/o, MLP and head, SigLIP's layers and the connector.
    assert len(kernels) >= 10, sorted(kernels)
    for path, k in kernels.items():
        want = 0.02 if init == "official" else k.shape[-2] ** -0.5
        assert k.std() == pytest.approx(want, rel=0.05), (path, k.shape, k.std(), want)
        assert abs(k.mean()) < 0.1 * want, path


def test_fan_in_changes_only_the_linear_kernels_and_the_position_embedding():
    official, fan_in = (nnx.to_flat_state(nnx.state(_model(init), nnx.Param))
                        for init in ("official", "fan_in"))
    changed = {"/".join(map(str, p)) for (p, a), (_, b) in zip(official, fan_in, strict=True)
               if not np.array_equal(np.asarray(a[...]), np.asarray(b[...]))}
    pos = "vision/pos_embed"
    assert changed == {p + "/kernel" for p in _kernels(_model("official"))} | {pos}


@pytest.mark.parametrize("init", ["official", "fan_in"])
def test_position_embedding_std(init):
    model = _model(init)
    pos = np.asarray(model.vision.pos_embed[...])
    width = pos.shape[-1]
    want = width ** -0.5 if init == "official" else 1.0
    assert pos.std() == pytest.approx(want, rel=0.1), (pos.shape, pos.std(), want)


def test_the_default_is_official_and_old_configs_load():
    cfg = variants.model_config("tiny")
    assert ModelConfig.from_config(cfg).init == "official"
    d = ModelConfig.from_config(cfg).to_dict()
    assert d["init"] == "official"
    del d["init"]  # a config.json written before the field existed
    assert ModelConfig.from_config(d).init == "official"
    for path, k in _kernels(_model(None)).items():
        assert k.std() == pytest.approx(0.02, rel=0.05), path


def test_an_unknown_init_names_the_choices():
    cfg = variants.model_config("tiny")
    cfg.init = "xavier"
    with pytest.raises(ValueError, match=r"unknown init 'xavier'.*official.*fan_in"):
        ModelConfig.from_config(cfg)
