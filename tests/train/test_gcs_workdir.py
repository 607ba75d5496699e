"""Training in a bucket: `--workdir gs://BUCKET/run` against the GCS emulator (`gcs`,
tests/conftest.py). A run stopped by SIGTERM and rerun ends with the losses of test_train's
uninterrupted local run A, bit for bit; everything it writes is an object in the bucket; the
workdir then loads (`lv.load`, `lladav-generate --ckpt`) with run A's parameters."""

import json
import os
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import nnx

import lladav_jax as lv
from lladav_jax.checkpoints import modeldir
from lladav_jax.cli import generate
from tests.train import test_train
from tests.train.test_train import STEPS, assert_nothing_leaked, command, rows_of

# test_train's fixtures: the small config, the one-device environment, and run A.
config_file, env, run_a = test_train.config_file, test_train.env, test_train.run_a


def rows_at(gcs, url: str) -> list[dict]:
    """The rows of URL/metrics.jsonl as the bucket holds them now ([] before the first)."""
    try:
        text = gcs.fs().cat_file(f"{url}/metrics.jsonl").decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


def start(cmd, environ, cwd, log) -> subprocess.Popen:
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(cmd, env=environ, cwd=cwd, stdout=out, stderr=err)


def finish(p: subprocess.Popen, log, timeout: float = 300) -> str:
    """Waits for `p`; it must exit 0. Returns its stdout."""
    try:
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    stdout, stderr = (pathlib.Path(f"{log}.{s}").read_text() for s in ("out", "err"))
    assert rc == 0, f"exit {rc}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return stdout


@pytest.mark.slow
def test_sigterm_and_resume_in_a_bucket_is_bitwise_exact(run_a, config_file, env, gcs, tmp_path):
    url = f"{gcs.bucket}/runs/b"
    cmd = command(config_file, url)
    e = {**env, **gcs.environ}  # the emulator's variables reach the trainer
    # Run from an empty directory: a URL taken for a relative path would show up there.
    p = start(cmd, e, tmp_path, tmp_path / "first")
    deadline = time.monotonic() + 300
    while len(rows_at(gcs, url)) < 3 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGTERM)
    stdout = finish(p, tmp_path / "first", timeout=120)
    stopped = rows_at(gcs, url)[-1]["step"]
    assert f"SIGTERM: checkpointed step {stopped}" in stdout, stdout[-3000:]
    assert 3 <= stopped < STEPS, "the run should have been stopped before its end"
    assert f"checkpoints/{stopped}/params/_METADATA" in gcs.objects("runs/b")

    stdout = finish(start(cmd, e, tmp_path, tmp_path / "second"), tmp_path / "second")
    assert_nothing_leaked((tmp_path / "second.err").read_text())
    assert f"resumed from step {stopped} ({url}/checkpoints/{stopped})" in stdout
    a, b = rows_of(run_a), rows_at(gcs, url)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # bitwise: exact float equality
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    assert sorted(os.listdir(tmp_path)) == ["first.err", "first.out", "second.err",
                                            "second.out"]  # the logs, nothing else

    stored = gcs.objects("runs/b")
    assert {"metrics.jsonl", "config.json", "train_config.json", "tokenizer.json", "loss.png",
            "eval.json", f"checkpoints/{STEPS}/params/_METADATA",
            f"checkpoints/{STEPS}/opt_state/_METADATA",
            f"checkpoints/{STEPS}/data/process_0-of-1.json"} <= set(stored), stored
    assert any(name.startswith(f"checkpoints/{STEPS}/meta/") for name in stored)
    events = [name for name in stored if name.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 2 and all(gcs.fs().size(f"{url}/{n}") > 0 for n in events)

    # The bucket workdir is a model directory: run A's parameters, whichever way it is read.
    want = jax.tree.leaves(modeldir.load_params(run_a))
    model = lv.load(url)
    got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model.module, nnx.Param)))
    assert len(got) == len(want) and all(np.array_equal(x, y) for x, y in zip(got, want))


@pytest.mark.slow
def test_generate_reads_a_bucket_workdir(run_a, gcs, capsys):
    """lladav-generate --ckpt gs://...: the answer of the same weights read from disk."""
    url = f"{gcs.bucket}/runs/copy"
    fs = gcs.fs()
    for root, _, files in os.walk(run_a):  # run A's workdir, copied into the bucket
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), run_a)
            fs.put_file(os.path.join(root, name), f"{url}/{rel}")
    flags = ["--prompt", "Say hi.", "--gen_length", "4", "--block_length", "4", "--steps", "2",
             "--output_ids"]
    answers = []
    for ckpt in (str(run_a), url):
        assert generate.main(["--ckpt", ckpt, *flags]) == 0
        answers.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert answers[0] == answers[1]
