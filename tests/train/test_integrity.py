"""Checkpoint integrity: checksums of what is saved, verified on restore; a state with NaN or
inf never saved (so never rotating a good checkpoint away); damaged checkpoints named and the
one before used."""

import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lladav_jax.train import integrity
from lladav_jax.train.bookkeeping import Bookkeeping
from lladav_jax.train.checkpoint import CheckpointError, Checkpoints, NonFiniteStateError
from lladav_jax.train.loop import train
from tests.train.test_train import STEPS, losses, small_config


def tree(value: float = 1.0) -> dict:
    return {"w": jnp.full((4, 8), value, jnp.float32), "b": jnp.arange(6, dtype=jnp.bfloat16),
            "count": jnp.asarray(3, jnp.int32)}


def test_checksums_see_every_changed_word_and_not_the_sharding():
    base, _ = integrity.summarize({"params": tree()})
    mesh = jax.make_mesh((8,), ("x",))
    sharded = {"params": {**tree(), "w": jax.device_put(
        tree()["w"], NamedSharding(mesh, PartitionSpec(None, "x")))}}
    assert integrity.summarize(sharded)[0] == base  # the figures of the values, not placement
    assert sorted(base) == ["params/b", "params/count", "params/w"]
    for i in range(32):  # any one word changed, anywhere: that array, and only it, differs
        w = np.ones((4, 8), np.float32)
        w.flat[i] = np.nextafter(np.float32(1), np.float32(2))
        changed, _ = integrity.summarize({"params": {**tree(), "w": jnp.asarray(w)}})
        assert integrity.mismatches(base, changed) == ["params/w"]
    swapped = np.arange(6, dtype=np.float32)[[1, 0, 2, 3, 4, 5]]  # same words, other places
    moved, _ = integrity.summarize({"params": {**tree(), "b": jnp.asarray(swapped, jnp.bfloat16)}})
    assert integrity.mismatches(base, moved) == ["params/b"]


def test_summarize_names_the_arrays_with_nan_or_inf():
    bad = {**tree(), "w": tree()["w"].at[1, 2].set(jnp.inf), "b": tree()["b"].at[0].set(jnp.nan)}
    _, nonfinite = integrity.summarize({"opt_state": bad})
    assert nonfinite == ["opt_state/b", "opt_state/w"]
    assert integrity.listed([f"a{i}" for i in range(8)], most=3) == "a0, a1, a2 and 5 more"


def abstract(tree_: dict) -> dict:
    """A restore target: the arrays' shapes, dtypes and shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree_)


def data_iterator():
    return iter(grain.MapDataset.range(8).to_iter_dataset())


def test_a_state_with_nan_is_never_saved_and_rotates_nothing_away(tmp_path):
    ckpts = Checkpoints(tmp_path, every=1, keep=2, asynchronous=False)
    book = Bookkeeping.start(0)
    for step in (1, 2):
        assert ckpts.save(step, tree(), tree(), book, data_iterator())
    with pytest.raises(NonFiniteStateError) as e:
        ckpts.save(3, {**tree(), "w": tree()["w"].at[0, 0].set(jnp.nan)}, tree(), book,
                   data_iterator())
    message = str(e.value)
    assert "step 3 was not saved: NaN or inf in params/w" in message
    assert "the checkpoints kept (steps 1, 2) are untouched" in message
    assert "Likely causes, most likely first" in message and "damaged weights" in message
    with pytest.raises(NonFiniteStateError, match="opt_state/b"):  # the optimizer state too
        ckpts.save(3, tree(), {**tree(), "b": tree()["b"].at[0].set(jnp.inf)}, book,
                   data_iterator(), force=True)
    ckpts.wait()
    assert list(ckpts.manager.all_steps()) == [1, 2]
    ckpts.close()


def damage(workdir: pathlib.Path, step: int, count: int = 64) -> None:
    """Overwrites `count` bytes in the middle of every parameter data file of the checkpoint
    of `step` with 0xFF (NaN as float32, where they land on raw values)."""
    for path in (workdir / "checkpoints" / str(step) / "params" / "ocdbt.process_0" /
                 "d").iterdir():
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + count] = b"\xff" * count
        path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_used(tmp_path, capfd):
    """The issue's case: 64 bytes of each of the latest checkpoint's parameter files overwritten (it
    used to load, NaN and all). The restore names it (by its checksums, or by the read error
    when the bytes hit compressed data), moves it aside and resumes from the one before: the
    losses are those of the undamaged run."""
    workdir, config = tmp_path / "run", small_config()
    train(config, str(workdir))
    reference = losses(workdir)
    damage(workdir, STEPS)
    capfd.readouterr()
    train(config, str(workdir))
    err = capfd.readouterr().err
    assert f"checkpoints/{STEPS} does not restore: " in err, err
    assert f"resuming from step {STEPS // 2}" in err
    assert (workdir / "checkpoints" / f"bad-{STEPS}").is_dir()
    assert losses(workdir) == reference


def saved_with(ckpts: Checkpoints, params: dict, meta: dict) -> None:
    """A checkpoint of step 1 written as given (past `Checkpoints.save`'s own checks)."""
    ckpts.manager.save(1, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(tree()),
        meta=ocp.args.JsonSave(meta), data=grain.checkpoint.CheckpointSave(data_iterator())))
    ckpts.wait()


def test_a_restore_names_arrays_that_differ_from_their_checksums_or_hold_nan(tmp_path):
    target = abstract(tree())
    ckpts = Checkpoints(tmp_path / "a", every=1, keep=2, asynchronous=False)
    checksums, _ = integrity.summarize({"params": tree(), "opt_state": tree()})
    checksums["params/b"] = [1, 2]  # what was saved, by its checksums, is not what is read
    saved_with(ckpts, tree(), {**Bookkeeping.start(0).to_json(), "checksums": checksums})
    with pytest.raises(CheckpointError, match=r"^1 arrays differ from what was saved "
                                              r"\(checksums\): params/b; its files are damaged"):
        ckpts.restore(1, target, target, data_iterator())
    ckpts.close()

    # A checkpoint from before checksums (none in its meta) is still checked for NaN and inf.
    ckpts = Checkpoints(tmp_path / "b", every=1, keep=2, asynchronous=False)
    saved_with(ckpts, {**tree(), "w": tree()["w"].at[2, 3].set(jnp.nan)},
               Bookkeeping.start(0).to_json())
    with pytest.raises(CheckpointError, match=r"^NaN or inf in params/w$"):
        ckpts.restore(1, target, target, data_iterator())
    ckpts.close()


def test_checkpoints_restore_what_they_saved(tmp_path):
    ckpts = Checkpoints(tmp_path, every=1, keep=2, asynchronous=True)
    ckpts.save(1, tree(), tree(2.0), Bookkeeping.start(0), data_iterator())
    ckpts.wait()
    target = abstract(tree())
    params, opt_state, book = ckpts.restore(1, target, target, data_iterator())
    jax.tree.map(np.testing.assert_array_equal, (params, opt_state), (tree(), tree(2.0)))
    assert book.step == 0
    ckpts.close()


def test_an_init_from_model_with_nan_is_refused_by_name(tmp_path):
    from flax import nnx

    from lladav_jax.checkpoints import modeldir
    from lladav_jax.models import lladav

    config = small_config({"train.steps": 1})
    params = nnx.to_pure_dict(nnx.state(lladav.create(config.model, seed=0), nnx.Param))
    params["connector"]["fc1"]["kernel"] = params["connector"]["fc1"]["kernel"].at[0, 0].set(
        jnp.nan)
    modeldir.save_model_dir(tmp_path / "model", params, config.model)
    config.init_from = str(tmp_path / "model")
    with pytest.raises(ValueError, match=r"init_from .*model: NaN or inf in connector/fc1/kernel"):
        train(config, str(tmp_path / "run"))
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # nothing saved
