"""LoRA and QLoRA runs (issue "Fine-tune and run LLaDA-V on one chip"): from a model directory,
only the adapters (and the connector, if its rate is above 0) train and hold optimizer state;
the base weights, float or quantized, leave the run bit-identical."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from lladav_jax.checkpoints import modeldir
from lladav_jax.models import adapters, lladav
from lladav_jax.train.config_check import ConfigError, check_config
from lladav_jax.train.loop import train
from tests.train.test_train import small_config

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "lora.targets": "q,v,down",
        "optim.lr": {"vision": 0.0, "connector": 0.0, "llm": 1e-2}, "train.steps": 3,
        "train.checkpoint_every": 3}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cfg = small_config().model
    return modeldir.save_model_dir(tmp_path_factory.mktemp("base") / "model",
                                   lladav.create(cfg, seed=1), cfg)


def flat(tree) -> dict:
    return {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def opt_state_names(workdir, step: int) -> set[str]:
    """The parameters that have optimizer moments in the checkpoint of `step`."""
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(workdir / "checkpoints" / str(step) / "opt_state").item_metadata.tree
    key = lambda k: str(getattr(k, "key", getattr(k, "idx", k)))
    names = {".".join(key(k) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return {n.split(".mu.", 1)[1].removesuffix(".value") for n in names if ".mu." in n}


def run(tmp_path, base_dir, **overrides):
    config = small_config({**LORA, "init_from": str(base_dir), **overrides})
    workdir = tmp_path / "run"
    train(config, str(workdir))
    return config, workdir


def test_lora_trains_only_the_adapters(tmp_path, base_dir):
    _config, workdir = run(tmp_path, base_dir)
    before = flat(modeldir.load_params(base_dir))
    after = flat(modeldir.load_params(workdir))  # a LoRA workdir is a model directory
    lora = {k for k in after if k.endswith(("lora_a", "lora_b"))}
    assert {k.rsplit(".", 2)[-2] for k in lora} == {"q", "v", "down"}
    assert set(after) - lora == set(before)
    assert [k for k in before if not np.array_equal(before[k], after[k])] == []
    assert all(np.abs(after[k]).max() > 0 for k in lora if k.endswith("lora_b"))  # trained
    # Optimizer moments for the adapters alone, a small fraction of a full fine-tune's.
    assert opt_state_names(workdir, 3) == {k for k in lora if k.startswith("llm.")}
    assert sum(after[k].size for k in lora) < 0.05 * sum(v.size for v in before.values())


@pytest.mark.slow
def test_qlora_keeps_its_int4_base_and_merges_to_the_float_layout(tmp_path, base_dir):
    _config, workdir = run(tmp_path, base_dir, **{"quantize.weights": "int4",
                                                  "quantize.tile": 32,
                                                  "optim.lr": {"vision": 0.0,
                                                               "connector": 1e-2,
                                                               "llm": 1e-2}})
    stored = modeldir.load_config(workdir)
    assert stored.quantize.weights == "int4" and stored.lora.rank == 4
    after = modeldir.load_params(workdir)
    expected = adapters.adapt(modeldir.load_params(base_dir), stored,
                              adapters=adapters.adapters_of(after))
    same = lambda part: [k for k, v in flat(expected[part]).items()
                         if not np.array_equal(v, flat(after[part])[k])]
    assert after["llm"]["layers"]["up"]["qvalue"].dtype == jax.numpy.int4
    assert same("llm") == []  # its quantized base as the start quantized, bit for bit
    assert np.abs(flat(after["llm"])["layers.q.lora_b"]).max() > 0  # the adapters trained
    assert same("connector")  # the connector trained whole (its rate is above 0)
    assert opt_state_names(workdir, 3) >= {"connector.fc1.kernel", "llm.layers.q.lora_a"}
    # Loaded as a model: the merged, dequantized weights in the plain layout.
    plain = modeldir.load_params_as(workdir, stored_plain := small_config().model)
    assert set(flat(plain)) == set(flat(lladav.abstract_params(stored_plain)))


@pytest.mark.parametrize("overrides,message", [
    ({"quantize.weights": "int8", "lora.rank": 0}, "quantize.weights='int8': quantized"),
    ({"lora.targets": "q,attn"}, "lora.targets: unknown ['attn']"),
    ({"quantize.weights": "int4", "quantize.tile": 48}, "quantize.tile 48 does not divide"),
])
def test_settings_lora_cannot_take_fail_before_any_work(overrides, message):
    config = small_config({**LORA, **overrides})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_config(config)
