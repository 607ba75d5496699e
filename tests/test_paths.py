"""`lladav_jax.paths`, and what goes through it on a bucket (the GCS emulator, `gcs` in
conftest.py): metrics.jsonl and TensorBoard, the loss curve, the tokenizer, model directories
(save, resolve, load, `lv.load`) and the converter. Training on a gs:// workdir:
tests/train/test_gcs_workdir.py."""

import json
import os
import struct

import jax
import numpy as np
import pytest
from flax import nnx

import lladav_jax as lv
from lladav_jax import paths
from lladav_jax.checkpoints import hf_convert, modeldir
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.models import lladav, variants
from lladav_jax.scale import sharding
from lladav_jax.train import metrics


def test_as_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.as_path("gs://b/run") / "x") == "gs://b/run/x"
    assert paths.as_path("run") == tmp_path / "run"
    assert paths.is_url("gs://b/run") and not paths.is_url(tmp_path / "run")


def test_write_whole_replaces_a_local_file_and_leaves_nothing_beside_it(tmp_path):
    paths.write_whole(tmp_path / "a.txt", "one\n")
    paths.write_whole(tmp_path / "a.txt", b"two\r\n")  # bytes as they are
    assert (tmp_path / "a.txt").read_bytes() == b"two\r\n"
    assert os.listdir(tmp_path) == ["a.txt"]


def rows_at(gcs, key: str) -> list[dict]:
    text = gcs.fs().cat_file(f"{gcs.bucket}/{key}").decode()
    return [json.loads(line) for line in text.splitlines()]


def scalars(gcs, prefix: str) -> set[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TensorBoard event files under `prefix`."""
    from tensorboardX.proto.event_pb2 import Event

    out = set()
    for name in gcs.objects(prefix):
        data, at = gcs.fs().cat_file(f"{gcs.bucket}/{prefix}/{name}"), 0
        while at < len(data):  # records: length (8 bytes), its CRC (4), the event, its CRC
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + n])
            out.update((v.tag, event.step, v.simple_value) for v in event.summary.value)
            at += 12 + n + 4
    return out


def test_metrics_writer_rewrites_the_object_and_drops_rows_past_a_resume(gcs):
    workdir = f"{gcs.bucket}/metrics"
    writer = metrics.MetricsWriter(workdir, resume_step=0)
    writer.write({"step": 1, "loss": 0.5})  # the first row goes out at once (no upload yet)
    for step in (2, 3, 4):
        writer.write({"step": step, "loss": 2.0**-step})  # exact in float32
    # Uploads are throttled (upload_every_s); a flush (before each checkpoint) writes all.
    assert [r["step"] for r in rows_at(gcs, "metrics/metrics.jsonl")] == [1]
    writer.flush()
    assert [r["step"] for r in rows_at(gcs, "metrics/metrics.jsonl")] == [1, 2, 3, 4]
    writer.close()
    assert scalars(gcs, "metrics/tensorboard") == {("loss", s, 2.0**-s) for s in (1, 2, 3, 4)}
    assert not os.path.exists(writer.tb.logdir)  # the local copy of the events is gone

    resumed = metrics.MetricsWriter(workdir, resume_step=2)  # died after step 4, saved at 2
    assert [r["step"] for r in rows_at(gcs, "metrics/metrics.jsonl")] == [1, 2]
    resumed.write({"step": 3, "loss": 0.125})
    resumed.close()
    assert rows_at(gcs, "metrics/metrics.jsonl") == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}]
    assert resumed.rows() == rows_at(gcs, "metrics/metrics.jsonl")
    assert ("loss", 3, 0.125) in scalars(gcs, "metrics/tensorboard")


def test_loss_curve_to_a_bucket(gcs):
    rows = [{"step": s, "loss": 2 / s, "learning_rate": 1e-3} for s in range(1, 6)]
    metrics.plot_loss(rows, f"{gcs.bucket}/plot/loss.png", title="t")
    assert gcs.fs().cat_file(f"{gcs.bucket}/plot/loss.png").startswith(b"\x89PNG\r\n\x1a\n")


def test_tokenizer_round_trip_on_a_bucket(gcs):
    tok = load_demo_tokenizer()
    assert tok.save(f"{gcs.bucket}/tok") == f"{gcs.bucket}/tok/tokenizer.json"
    assert gcs.objects("tok") == ["tokenizer.json"]  # no temporary object left
    for path in (f"{gcs.bucket}/tok", f"{gcs.bucket}/tok/tokenizer.json"):
        assert Tokenizer.load(path).to_json() == tok.to_json()
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.load(f"{gcs.bucket}/nothing")


def assert_same(tree, want) -> None:
    """Every parameter bit-identical (parameter trees flatten in the same order)."""
    a, b = jax.tree.leaves(tree), jax.tree.leaves(want)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, parameters as a pure dict of numpy arrays, other parameters of the same shapes,
    a local directory holding the demo tokenizer)."""
    tok_dir = tmp_path_factory.mktemp("tok")
    load_demo_tokenizer().save(tok_dir)
    cfg = variants.model_config("tiny")
    rng = np.random.default_rng(0)  # random values of the right shapes: nothing to compile
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype),
                          lladav.abstract_params(cfg))
    return cfg, params, jax.tree.map(lambda x: x + 1, params), tok_dir


def test_model_directory_on_a_bucket(gcs, tiny):
    cfg, params, other, tok_dir = tiny
    url = f"{gcs.bucket}/models/tiny"
    assert os.fspath(modeldir.save_model_dir(url, params, cfg, tokenizer_dir=tok_dir)) == url
    stored = gcs.objects("models")
    assert {"tiny/config.json", "tiny/tokenizer.json", "tiny/params/_METADATA"} <= set(stored)
    assert all(p.startswith("tiny/") for p in stored), stored  # the temporary name is gone

    assert_same(modeldir.load_params(url), params)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # as init_from restores
    sharded = modeldir.load_params(url, cfg, mesh=mesh)
    assert_same(sharded, params)
    assert {x.sharding.mesh for x in jax.tree.leaves(sharded)} == {mesh}
    m = lv.load(url)
    assert_same(nnx.to_pure_dict(nnx.state(m.module, nnx.Param)), params)
    assert m.tokenizer.to_json() == load_demo_tokenizer().to_json()
    embed = modeldir.open_params(url)[("llm", "embed", "embedding")]  # slice reads
    np.testing.assert_array_equal(embed[2:5], params["llm"]["embed"]["embedding"][2:5])

    with pytest.raises(FileExistsError):
        modeldir.save_model_dir(url, params, cfg)
    modeldir.save_model_dir(url, other, cfg, overwrite=True)
    assert_same(modeldir.load_params(url), other)
    assert all(p.startswith("tiny/") for p in gcs.objects("models"))


def test_workdir_layout_on_a_bucket_resolves_to_its_latest_step(gcs, tiny):
    cfg, params, other, _ = tiny
    work = paths.as_path(f"{gcs.bucket}/work")
    for step, tree in ((3, params), (12, other)):  # 12 after 3 although "12" < "3" as text
        modeldir.save_model_dir(work / modeldir.CHECKPOINTS_DIR / str(step), tree, cfg)
    paths.write_whole(work / modeldir.CONFIG_FILE, modeldir.config_to_json(cfg))
    resolved = modeldir.resolve(os.fspath(work))
    assert os.fspath(resolved.params) == f"{gcs.bucket}/work/checkpoints/12/params"
    assert_same(modeldir.load_params(work), other)


def test_convert_to_and_from_a_bucket(gcs, tiny, tmp_path):
    """export-hf into the bucket, import-hf back from it (ranged reads of the safetensors
    objects): the parameters come back bit for bit."""
    cfg, params, _, tok_dir = tiny
    local = modeldir.save_model_dir(tmp_path / "model", params, cfg, tokenizer_dir=tok_dir)
    hf = f"{gcs.bucket}/convert/hf"
    hf_convert.export_hf(local, hf, dtype="float32", shard_bytes=200_000, progress=False)
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(
        gcs.objects("convert/hf"))
    back = hf_convert.import_hf(hf, f"{gcs.bucket}/convert/back", progress=False)
    assert_same(modeldir.load_params(back), modeldir.load_params(local))
