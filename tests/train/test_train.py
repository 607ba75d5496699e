"""The trainer's promises (issue 4, "What must hold"), on the tiny model and synthetic data.

Training runs are `python -m lladav_jax.train` / `lladav-train` subprocesses, as a user runs
them: SIGTERM goes to a real process, the device count is set per run (1, 8, or 4 processes of
2), and a crash fails one test, not the session. Run A (one device, 8 steps) is the reference
the others are compared with; the one-device runs share a persistent compilation cache, so
repeating a program costs no compile.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.example import BATCH_KEYS
from lladav_jax.scale import sharding
from lladav_jax.train.defaults import base_config
from lladav_jax.train.inputs import load_tokenizer, make_batches
from lladav_jax.train.loop import train

STEPS = 8
# Small: 96 samples (12 batches of 8; windows of 32), one length bucket, one eval batch.
SMALL = {
    "data.size": 96,
    "data.eval_size": 8,
    "data.seq_len": 256,
    "data.length_buckets": (256,),
    "data.batch_size": 8,
    "data.window": 32,
    "data.num_workers": 0,
    "optim.lr": {"vision": 1e-3, "connector": 1e-3, "llm": 1e-3},
    "train.steps": STEPS,
    "train.log_every": 1,
    "train.checkpoint_every": 4,
    "train.progress_bar": False,
    "train.peak_tflops_per_device": 1.0,  # skip measuring the CPU
    "distributed.mode": "off",
}

CONFIG_PY = f'''
from lladav_jax.train.defaults import base_config

SMALL = {SMALL!r}


def get_config():
    c = base_config("tiny")
    for key, value in SMALL.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
'''


def small_config(overrides: dict | None = None):
    """base_config('tiny') + SMALL + overrides (dotted keys), as the config file builds it."""
    c = base_config("tiny")
    for key, value in {**SMALL, **(overrides or {})}.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def rows_of(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def losses(workdir) -> list[float]:
    return [r["loss"] for r in rows_of(workdir)]


def assert_one_row_per_step(workdir, steps: int = STEPS) -> None:
    assert [r["step"] for r in rows_of(workdir)] == list(range(1, steps + 1))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: one CPU device, a compilation cache shared by these runs."""
    e = dict(os.environ)
    e.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return e


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("config") / "small.py"
    path.write_text(CONFIG_PY)
    return path


def command(config_file, workdir, *flags, entry=(sys.executable, "-m", "lladav_jax.train")):
    return [*entry, "--config", str(config_file), "--workdir", str(workdir), *flags]


def run(cmd, env, timeout=300) -> str:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert_nothing_leaked(p.stderr)
    return p.stdout


def assert_nothing_leaked(stderr: str) -> None:
    """No shared memory of the data workers' batches left at exit (Python's resource tracker
    warns "There appear to be N leaked shared_memory objects to clean up at shutdown")."""
    assert "leaked" not in stderr, stderr[-5000:]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, config_file, env) -> pathlib.Path:
    """The reference: STEPS uninterrupted steps on one device, no data workers."""
    workdir = tmp_path_factory.mktemp("run_a")
    run(command(config_file, workdir), env)
    assert_one_row_per_step(workdir)
    return workdir


def run_until_stopped(cmd, env, workdir, rows: int, log, sig=signal.SIGTERM) -> int:
    """Starts `cmd`, sends it `sig` once WORKDIR/metrics.jsonl has `rows` rows; it must
    checkpoint and exit 0 before its end. SIGINT goes to the whole process group, data workers
    included, as Ctrl-C in a terminal sends it. Returns the step it stopped at."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while (len(rows_of(workdir)) < rows and p.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            if sig == signal.SIGINT:
                os.killpg(p.pid, sig)
            else:
                os.kill(p.pid, sig)
            rc = p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
    stdout, stderr = pathlib.Path(f"{log}.out").read_text(), pathlib.Path(f"{log}.err").read_text()
    assert rc == 0, f"exit {rc}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    assert "Traceback" not in stderr, stderr[-5000:]
    assert_nothing_leaked(stderr)
    stopped = rows_of(workdir)[-1]["step"]
    assert f"{sig.name}: checkpointed step {stopped}" in stdout, stdout[-3000:]
    assert rows <= stopped < STEPS, "the run should have been stopped before its end"
    assert (workdir / "checkpoints" / str(stopped)).is_dir()
    return stopped


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stop_and_resume_is_bitwise_exact(run_a, config_file, env, tmp_path, sig):
    """Run B (a Grain worker process) is stopped by SIGTERM (a preemption) or Ctrl-C after a
    few steps, checkpoints and exits 0; the same command resumes it; its metrics.jsonl equals
    run A's bit for bit."""
    workdir = tmp_path / "b"
    cmd = command(config_file, workdir, "--config.data.num_workers=1")
    stopped = run_until_stopped(cmd, env, workdir, 3, tmp_path / "b", sig)
    stdout = run(cmd, env)
    assert f"resumed from step {stopped}" in stdout
    assert_one_row_per_step(workdir)
    a, b = rows_of(run_a), rows_of(workdir)
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # bitwise: exact float equality
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    assert [r["samples"] for r in b] == [r["samples"] for r in a]


@pytest.mark.slow
def test_finished_workdir_resumes_at_its_end_and_is_a_model_dir(run_a, config_file, env,
                                                                 tmp_path):
    workdir = tmp_path / "a"
    shutil.copytree(run_a, workdir)
    before = rows_of(workdir)
    stdout = run(command(config_file, workdir, entry=("lladav-train",)), env)
    assert f"resumed from step {STEPS}" in stdout
    assert rows_of(workdir) == before  # not one step retrained
    assert sorted(int(d.name) for d in (workdir / "checkpoints").iterdir()
                  if d.name.isdigit())[-1] == STEPS

    paths = modeldir.resolve(workdir)
    assert paths.params == workdir / "checkpoints" / str(STEPS) / "params"
    model, cfg = modeldir.load_model(workdir)
    assert cfg.to_dict() == small_config().model.to_dict()
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:  # the step-8 params, read without modeldir
        stored = ckptr.restore(workdir / "checkpoints" / str(STEPS) / "params")
    jax.tree.map(np.testing.assert_array_equal, loaded, stored)
    with ocp.StandardCheckpointer() as ckptr:
        earlier = ckptr.restore(workdir / "checkpoints" / "4" / "params")
    assert not np.array_equal(earlier["llm"]["embed"]["embedding"],
                              stored["llm"]["embed"]["embedding"])  # the latest step's


@pytest.mark.slow
def test_one_device_equals_8_devices_and_restore_onto_another_mesh(run_a, config_file, env,
                                                                  tmp_path):
    """8 simulated devices on a (data 2, fsdp 2, tensor 2) mesh train as one device does; a
    checkpoint of that run resumes on a (1, 8, 1) mesh and goes on as one device would."""
    # With XLA:CPU's default (concurrency-optimised) scheduler, the 8 simulated devices of
    # this train step deadlock in a collective rendezvous now and then on a 2-core machine
    # (all pool threads wait in one collective while a device never reaches another); XLA
    # aborts after 40 s. The plain scheduler did not deadlock in any of our runs.
    env8 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
            "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
    workdir = tmp_path / "c"
    cmd = command(config_file, workdir, "--config.mesh.data=2", "--config.mesh.fsdp=2",
                  "--config.mesh.tensor=2")
    stopped = run_until_stopped(cmd, env8, workdir, 5, tmp_path / "c")
    want = losses(run_a)
    np.testing.assert_allclose(losses(workdir), want[:stopped], rtol=1e-4)

    stdout = run(command(config_file, workdir, "--config.mesh.fsdp=8"), env8)
    assert f"resumed from step {stopped}" in stdout
    assert_one_row_per_step(workdir)
    np.testing.assert_allclose(losses(workdir), want, rtol=1e-4)


def after_at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


@pytest.mark.slow
def test_stage1_changes_only_the_connector(run_a, config_file, env, tmp_path):
    """lr {vision: 0, connector: 1e-3, llm: 0}, starting from a model directory: afterwards
    every vision and LLM parameter is bit-identical and every connector parameter changed."""
    cfg = small_config().model
    before = modeldir.load_params(run_a, cfg)
    init_dir = modeldir.save_model_dir(tmp_path / "init", before, cfg)
    workdir = tmp_path / "stage1"
    run(command(config_file, workdir, "--config.optim.lr.vision=0", "--config.optim.lr.llm=0",
                f"--config.init_from={init_dir}", "--config.train.steps=3"), env)
    after = modeldir.load_params(workdir, cfg)  # its latest checkpoint
    changed = {}
    for path, a in jax.tree_util.tree_leaves_with_path(before):
        name = ".".join(str(k.key) for k in path)
        changed[name] = not np.array_equal(np.asarray(a), np.asarray(after_at(after, path)))
    parts = {n.split(".")[0] for n in changed}
    assert parts == {"vision", "llm", "connector", "image_newline"}
    connector = {n for n in changed if n.split(".")[0] in ("connector", "image_newline")}
    assert connector >= {"connector.fc1.kernel", "connector.fc2.kernel", "image_newline"}
    assert sorted(n for n in connector if not changed[n]) == []  # every one of them trained
    assert sorted(n for n in changed if changed[n] and n not in connector) == []  # nothing else


@pytest.mark.slow
def test_nonfinite_loss_skips_counts_and_stops(config_file, env, tmp_path):
    """lr 1e30: step 1 throws the weights to ~1e30, the forward pass overflows from then on;
    those updates are skipped and counted, and the run stops after the configured number."""
    workdir = tmp_path / "nan"
    cmd = command(config_file, workdir, *(f"--config.optim.lr.{p}=1e30" for p in
                                          ("vision", "connector", "llm")),
                  "--config.optim.warmup_ratio=0", "--config.train.max_nonfinite_in_a_row=3",
                  "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=10")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert ("NonFiniteLossError: 3 steps in a row had a non-finite loss or gradient"
            in p.stderr), p.stderr[-5000:]
    assert "Likely causes, most likely first: the learning rate" in p.stderr
    rows = rows_of(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 1]
    assert np.isfinite(rows[0]["loss"]) and not np.isfinite(rows[-1]["loss"])
    # Skipped updates changed nothing: the weights after steps 2 and 3 are those after step 1.
    ckpt = workdir / "checkpoints"
    after = [modeldir.load_params(ckpt / str(s)) for s in (1, 2, 3)]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after[0]))
    for later in after[1:]:
        jax.tree.map(np.testing.assert_array_equal, later, after[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_batch_does_not_depend_on_the_process_count():
    """Every process plans the same global batches and featurizes only the samples of its
    rows: the rows of 2 or 4 processes, put together, are the one-process batch (every array,
    the global counts, the skips), and each process featurized its share of the samples."""
    cfg, tok = small_config(), load_tokenizer("")
    whole_it = iter(make_batches(cfg, tok)[0])
    whole = list(whole_it)
    assert len(whole) == 12 and whole_it.featurized == 96  # every sample, once
    # Contiguous rows for 2 processes, interleaved ones for 4 (as a mesh may order them).
    for parts in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]]):
        its = [iter(make_batches(cfg, tok, rows)[0]) for rows in parts]
        got = [list(it) for it in its]
        assert [len(g) for g in got] == [len(whole)] * len(parts)
        for b, pieces in zip(whole, zip(*got)):
            for k, v in b.items():
                if k in BATCH_KEYS:
                    put = np.zeros_like(v)
                    for rows, piece in zip(parts, pieces):
                        assert piece[k].shape[0] == len(rows)
                        put[rows] = piece[k]
                    np.testing.assert_array_equal(put, v, err_msg=k)
                elif k == "local_skips":  # counted by whoever featurized
                    assert sum(p[k]["corrupt_image"] for p in pieces) == v["corrupt_image"]
                else:  # num_samples, num_tokens, num_tiles, skips: global
                    assert all(p[k] == v for p in pieces), k
        featurized = [it.featurized for it in its]
        assert sum(featurized) == 96 and max(featurized) <= 96 / len(parts), featurized
    assert int(whole[0]["num_samples"]) == 8
    for b in whole:  # real tiles are never all zeros once normalised; padding tiles are
        assert b["num_tiles"] == int(b["pixels"].any(axis=(2, 3, 4)).sum())


PROCESSES = 4  # of 2 simulated CPU devices each


@pytest.mark.slow
def test_four_processes_of_two_devices_train_as_one(run_a, config_file, env, tmp_path):
    """4 processes of 2 CPU devices each (collectives over gloo) on a data=8 mesh: the losses
    of one process (on 1 device, which trains as 8 do: the test above), and each process
    featurized only the samples of its rows (its Grain state in the checkpoint counts them)."""
    workdir, port = tmp_path / "mh", free_port()
    flags = ["--config.mesh.data=-1", "--config.mesh.fsdp=1",
             "--config.distributed.mode=explicit",
             f"--config.distributed.coordinator=127.0.0.1:{port}",
             f"--config.distributed.num_processes={PROCESSES}"]
    # No shared compilation cache: the processes would write the same entries at once.
    e = {k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT_CACHE")
         and k != "JAX_COMPILATION_CACHE_DIR"}
    e["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")
    logs = [tmp_path / f"process{i}.log" for i in range(PROCESSES)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    command(config_file, workdir, *flags, f"--config.distributed.process_id={i}"),
                    env=e, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 600
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{log.name}: exit {p.returncode}\n{log.read_text()[-5000:]}"
    assert_one_row_per_step(workdir)
    np.testing.assert_allclose(losses(workdir), losses(run_a), rtol=1e-4)
    # One job of four processes, each with its own Grain state.
    data = workdir / "checkpoints" / str(STEPS) / "data"
    states = {f.name: json.loads(f.read_text()) for f in data.glob("*.json")}
    assert sorted(states) == [f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)]
    featurized = [s["featurized"] for s in states.values()]
    trained = sum(r["samples"] for r in rows_of(workdir))  # the global batches' samples
    window = SMALL["data.window"]
    assert sum(featurized) == trained  # each sample by one process
    assert max(featurized) <= trained / PROCESSES + window, featurized


def test_a_mesh_that_does_not_fit_fails_before_training(tmp_path):
    with pytest.raises(sharding.MeshError, match="does not divide the 8 devices"):
        train(small_config({"mesh.data": 3}), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    # A batch whose micro-batches the 8 devices of the batch axes cannot share.
    with pytest.raises(sharding.MeshError, match="multiple of data x fsdp = 8"):
        train(small_config({"data.batch_size": 12}), str(tmp_path / "rows"))
    assert not (tmp_path / "rows").exists()
