"""Logical axes -> mesh: the tiny model on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lladav_jax.models import lladav, variants
from lladav_jax.scale import sharding


def random_batch(cfg, b: int = 4, n: int = 40, tiles: int = 2, v: int = 24) -> dict:
    rng = np.random.default_rng(0)
    s, p = cfg.vision.image_size, (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    pos = np.stack([rng.permutation(n)[:v] for _ in range(b)]).astype(np.int32)
    pos[:, -3:] = n  # unused rows are dropped
    return dict(
        tokens=rng.integers(0, cfg.text.vocab_size, (b, n)).astype(np.int32),
        segment_ids=np.ones((b, n), np.int32),
        pixels=rng.uniform(-1, 1, (b, tiles, s, s, 3)).astype(np.float32),
        visual_pos=pos,
        visual_src=rng.integers(0, tiles * p + 1, (b, v, 4)).astype(np.int32),
        visual_w=rng.uniform(0, 1, (b, v, 4)).astype(np.float32),
    )


@pytest.mark.slow
def test_mesh_placement_and_same_logits():
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    cfg = variants.model_config("tiny")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single = lladav.create(cfg, seed=3)
    sharded = lladav.create(cfg, seed=3, mesh=mesh)
    spec = lambda x: x[...].sharding.spec
    assert spec(sharded.llm.layers.q.kernel) == P(None, "fsdp", "tensor")
    assert spec(sharded.llm.layers.down.kernel) == P(None, "tensor", "fsdp")
    assert spec(sharded.llm.embed.embedding) == P("tensor", "fsdp")
    assert spec(sharded.llm.lm_head.kernel) == P("fsdp", "tensor")
    assert spec(sharded.vision.layers.fc1.kernel) == P(None, "fsdp", "tensor")
    assert spec(sharded.llm.layers.attn_norm.weight) == P(None, None)
    # Each device holds only its shard: born sharded, never whole on one device.
    q = sharded.llm.layers.q.kernel[...]
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
    for a, b in zip(jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(sharded)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    batch = random_batch(cfg)
    forward = nnx.jit(lambda m, b: m(**b))
    want = np.asarray(forward(single, batch))
    with sharding.sharding_context(mesh):
        got = forward(sharded, batch)
    assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_mesh_that_does_not_fit_is_named():
    with pytest.raises(sharding.MeshError, match="needs 16 devices but 8"):
        sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 2})
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_slices_split_the_data_axis():
    """Multislice: the data axis spans slices, outermost; fsdp and tensor stay in a slice."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1, "slices": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # Without slice_index (CPU): slice k is the k-th block of devices.
    assert list(mesh.devices[0].flat) == jax.devices()[:4]
    assert list(mesh.devices[1].flat) == jax.devices()[4:]
    with pytest.raises(sharding.MeshError, match="data=1 is not a multiple of slices=2"):
        sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "slices": 2})
    with pytest.raises(sharding.MeshError, match="data=2 is not a multiple of slices=4"):
        sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "slices": 4})
    # Positional sizes and dicts without `slices` build as before.
    assert dict(sharding.make_mesh([2, 4, 1]).shape) == {"data": 2, "fsdp": 4, "tensor": 1}


class FakeDevice:
    """What the hybrid mesh reads of a multislice TPU device (slice_index), on the CPU path."""

    platform, device_kind = "cpu", "fake"

    def __init__(self, id: int, slice_index: int):
        self.id, self.slice_index = id, slice_index

    def __repr__(self):
        return f"Fake({self.id}, slice {self.slice_index})"


def test_devices_of_a_slice_stay_together():
    # Slices interleaved in the device list, as process order may give them.
    devices = [FakeDevice(i, i % 2) for i in range(16)]
    grid = sharding.device_grid([4, 2, 2], 2, devices)
    assert grid.shape == (4, 2, 2)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    np.testing.assert_array_equal(slice_of[:2], 0)  # data rows 0-1: slice 0, over ICI
    np.testing.assert_array_equal(slice_of[2:], 1)
    assert sorted(d.id for d in grid.flat) == list(range(16))
    with pytest.raises(sharding.MeshError, match="belong to 2 slices"):
        sharding.device_grid([4, 2, 2], 4, devices)


def _layout(rules=()):
    """The trainer's (and lladav-plan's) model layout of `tiny` on (2, 2, 2), mesh.rules set."""
    from lladav_jax.train import optim
    from lladav_jax.train.defaults import base_config
    from lladav_jax.train.state import model_layout

    config = base_config("tiny")
    config.mesh.update(dict(data=2, fsdp=2, tensor=2, rules=rules))
    mesh = sharding.make_mesh(dict(config.mesh))
    tx, _ = optim.make_optimizer(config.optim, 10)
    return model_layout(config, mesh, tx), mesh


@pytest.mark.slow
def test_mesh_rules_replace_default_rules():
    """config.mesh.rules `embed` -> None: embeddings replicated over fsdp (still split over
    tensor by `vocab`) where the trainer places parameters, the rest as before."""
    embedding = lambda layout: nnx.to_pure_dict(layout.sharded)["llm"]["embed"]["embedding"]
    q = lambda layout: nnx.to_pure_dict(layout.sharded)["llm"]["layers"]["q"]["kernel"]
    default, mesh = _layout()
    assert default.rules == sharding.DEFAULT_RULES
    assert embedding(default).sharding.spec == P("tensor", "fsdp")
    assert q(default).sharding.spec == P(None, "fsdp", "tensor")
    # As --config.mesh.rules gives them: pairs, one pair alone, a repeated flag's flat tuple;
    # and as train_config.json holds them (lists).
    for rules in ((("embed", None),), ("embed", None), ("embed", None, "mlp", "tensor"),
                  [["embed", None]]):
        layout, _ = _layout(rules)
        assert embedding(layout).sharding.spec == P("tensor", None)
        assert q(layout).sharding.spec == P(None, None, "tensor")
        assert [r for r in layout.rules if r not in sharding.DEFAULT_RULES] == [("embed", None)]
        assert len(layout.rules) == len(sharding.DEFAULT_RULES)
    # A model born on the mesh by those rules (the trainer's fresh start) agrees.
    model = lladav.create(variants.model_config("tiny"), seed=0, mesh=mesh, rules=layout.rules)
    assert model.llm.embed.embedding[...].sharding.spec == P("tensor", None)
    assert sharding.logical_rules((("batch", ["data", "fsdp", "tensor"]),))[0] == (
        "batch", ("data", "fsdp", "tensor"))


def test_the_batch_rule_places_input_batches():
    """The `batch` rule splits the step's input rows as it splits the activations, and the batch
    check divides by what it spans."""
    from lladav_jax.train.defaults import base_config
    from lladav_jax.train.state import abstract_batch, check_batch

    config = base_config("tiny")
    config.data.batch_size, config.train.grad_accum = 4, 1
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    mesh = sharding.make_mesh(dict(config.mesh))
    assert abstract_batch(config, mesh)["tokens"].sharding.spec == P(None, ("data", "fsdp"), None)
    check_batch(config, mesh)
    config.mesh.rules = (("batch", "data"),)
    assert abstract_batch(config, mesh)["tokens"].sharding.spec == P(None, "data", None)
    config.data.batch_size = 2
    check_batch(config, mesh)  # 2 rows over data (2): fine, fsdp holds copies
    config.mesh.rules = ()
    with pytest.raises(sharding.MeshError, match=r"multiple of data x fsdp = 4"):
        check_batch(config, mesh)


def test_bad_mesh_rules_are_named():
    with pytest.raises(sharding.MeshError, match=r"no logical axis 'embd'; the rules name batch"):
        _layout((("embd", None),))
    with pytest.raises(sharding.MeshError, match=r"embed -> 'fdsp': 'fdsp' not a mesh axis"):
        _layout((("embed", "fdsp"),))
    with pytest.raises(sharding.MeshError, match=r"\('embed',\) is not \(logical name, mesh"):
        sharding.logical_rules(("embed",))
    with pytest.raises(sharding.MeshError, match=r"\('embed', None, 'mlp'\) is not a \(logical"):
        sharding.logical_rules((("embed", None, "mlp"),))
