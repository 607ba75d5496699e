"""launch/tpu.sh: the TPU VM script prints (dry run) or runs exactly the commands it means.

Dry runs are parsed back into argument lists with shlex, so a check sees what the shell would
pass. The remote commands that start and stop training on a worker are executed here, in a
fake home with a stand-in lladav-train, to check that they are valid shell, pass arguments
through intact, return while the training goes on, and refuse a second trainer. `gcloud` (and
the other commands the script runs) are stand-ins that record their arguments (conftest.py).
"""

import contextlib
import os
import pathlib
import signal
import subprocess
import tarfile
import time

import pytest

from lladav_jax.scale import distributed
from tests.launch.helpers import (
    OVERRIDES,
    REPO,
    TPU,
    TRAIN,
    TRAIN_GS,
    commands,
    dry_tpu,
    launch,
    remote,
)

# --- create ----------------------------------------------------------------------------------


def test_create_tpu_vm():
    assert dry_tpu("create", *TPU, "--accelerator", "v5p-64") == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "lla", "--zone=us-east5-a",
        "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5"]]


@pytest.mark.parametrize("capacity", ["--spot", "--reserved"])
def test_create_queued_resource_waits_until_active(capacity):
    create, describe = dry_tpu("create", *TPU, "--project", "proj", "--accelerator", "v5p-64",
                               "--queued", capacity)
    assert create == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "lla", "--zone=us-east5-a",
        "--project=proj", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
        "--node-id=lla", capacity]
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "lla"]
    assert "--format=value(state.state)" in describe


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v6e-256", "v2-alpha-tpuv6e"), ("v3-8", "tpu-ubuntu2204-base")])
def test_runtime_version_follows_the_generation(accelerator, runtime):
    (cmd,) = dry_tpu("create", *TPU, "--accelerator", accelerator)
    assert f"--accelerator-type={accelerator}" in cmd
    assert f"--version={runtime}" in cmd
    (cmd,) = dry_tpu("create", *TPU, "--accelerator", accelerator, "--runtime-version=mine")
    assert "--version=mine" in cmd


# --- setup -----------------------------------------------------------------------------------


def test_setup_copies_this_checkout_to_every_worker():
    tar, scp, ssh = dry_tpu("setup", *TPU, "--bucket", "gs://bkt/")
    assert tar[:3] == ["tar", "-C", str(REPO)] and "--exclude-vcs" in tar
    tarball = tar[tar.index("-czf") + 1]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                   "lla:lladav-src.tar.gz", "--zone=us-east5-a", "--worker=all"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lla"]
    assert "--worker=all" in ssh
    script = remote(ssh)
    assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt /mnt/gcs" in script
    assert 'tar -xzf "$HOME/lladav-src.tar.gz" -C "$HOME/lladav-jax"' in script
    assert "--python 3.12" in script
    assert 'pip install -q --python "$HOME/lladav-venv"/bin/python -e "$HOME/lladav-jax[tpu]"' \
        in script
    # The stages happen in this order on the worker.
    keys = ["lladav-train is running", "install -y gcsfuse", "gcsfuse --implicit-dirs",
            "tar -xzf", "uv\" venv", "uv\" pip install"]
    positions = [script.index(k) for k in keys]
    assert positions == sorted(positions)


def test_setup_without_a_bucket_mounts_nothing():
    *_, ssh = dry_tpu("setup", *TPU)
    script = remote(ssh)
    assert "gcsfuse" not in script and "mountpoint" not in script
    assert 'uv" pip install' in script


def test_setup_tarball_holds_the_checkout(calls):
    proc = launch("tpu.sh", "setup", *TPU, "--bucket", "bkt")
    tar, scp, ssh = calls()
    assert tar[0] == "tar"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    # What ran is what was printed (on stderr, outside a dry run).
    assert commands(proc.stderr) == [tar, scp, ssh]
    with tarfile.open(scp[5]) as tar:
        names = set(tar.getnames())
    assert {"./setup.py", "./launch/tpu.sh", "./lladav_jax/cli/train.py"} <= names
    assert not any(n.startswith("./.git/") or "__pycache__" in n for n in names)


def test_setup_clones_a_git_source():
    (ssh,) = dry_tpu("setup", *TPU, "--bucket", "bkt", "--source",
                     "https://github.com/org/lladav-jax.git", "--ref", "v1.2")
    script = remote(ssh)
    assert 'git clone -q https://github.com/org/lladav-jax.git "$HOME/lladav-jax"' in script
    assert 'git -C "$HOME/lladav-jax" checkout -q v1.2' in script
    assert "tar -xzf" not in script


# --- train, logs, stop -----------------------------------------------------------------------


def test_train_starts_the_same_command_on_every_worker():
    (ssh,) = dry_tpu("train", *TPU, *TRAIN_GS, train=OVERRIDES)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lla"]
    assert "--worker=all" in ssh
    script = remote(ssh)
    assert ('nohup "$HOME/lladav-venv"/bin/lladav-train --config configs/stage2a.py '
            "--workdir gs://bkt/runs/s2a --config.data.path=/mnt/gcs/data/\\* "
            "--config.init_from=/mnt/gcs/stage1 >> \"$HOME/lladav-train.log\" 2>&1 < /dev/null &"
            ) in script
    assert "mesh.slices" not in script
    assert "LLADAV_DISTRIBUTED=1 " in script  # every host starts jax.distributed
    assert "JAX_COMPILATION_CACHE_DIR=gs://bkt/jax-cache " in script  # the workdir's bucket
    assert "mountpoint -q /mnt/gcs" in script  # the data lie under the mount


def test_train_workdir_defaults_to_the_bucket_and_needs_no_mount():
    (ssh,) = dry_tpu("train", *TPU, "--config", "configs/stage2a.py", "--bucket", "gs://bkt/",
                     train=["--config.data.path=gs://bkt/data"])
    script = remote(ssh)
    assert "--workdir gs://bkt/runs/stage2a --config.data.path=gs://bkt/data >>" in script
    assert "JAX_COMPILATION_CACHE_DIR=gs://bkt/jax-cache " in script
    assert "mountpoint" not in script  # nothing it names lies under the mount


def test_train_in_a_workdir_under_the_mount():
    (ssh,) = dry_tpu("train", *TPU, *TRAIN)
    script = remote(ssh)
    assert "--workdir /mnt/gcs/runs/s2a >>" in script
    assert "JAX_COMPILATION_CACHE_DIR=/mnt/gcs/jax-cache " in script
    assert "mountpoint -q /mnt/gcs" in script


def test_launch_environment_starts_jax_distributed(monkeypatch):
    """TPU VMs made by gcloud set none of the cluster variables; LLADAV_DISTRIBUTED does."""
    for key in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "MEGASCALE_COORDINATOR_ADDRESS",
                "LLADAV_DISTRIBUTED"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed._cluster_detected()
    monkeypatch.setenv("LLADAV_DISTRIBUTED", "1")
    assert distributed._cluster_detected()


@pytest.fixture
def worker(tmp_path):
    """A fake worker: a home with the code directory and a stand-in lladav-train that records
    its environment, then its arguments (the sign that both are there), and runs until SIGTERM;
    `mountpoint` answers per FAKE_MOUNTED. Yields (env, home); ends the stand-in if a test left
    it running."""
    home = tmp_path / "home"
    (home / "lladav-jax").mkdir(parents=True)
    venv_bin = home / "lladav-venv" / "bin"
    venv_bin.mkdir(parents=True)
    trainer = venv_bin / "lladav-train"
    trainer.write_text("""#!/usr/bin/env bash
trap 'echo TERM > "$HOME/terminated"; exit 0' TERM
env > "$HOME/env"
printf '%s\\n' "$PWD" "$@" > "$HOME/args.part" && mv "$HOME/args.part" "$HOME/args"
for _ in $(seq 600); do sleep 0.1; done
""")
    trainer.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mountpoint").write_text('#!/bin/sh\nexit "${FAKE_MOUNTED:-0}"\n')
    (bin_dir / "mountpoint").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    yield env, home
    pid_file = home / "lladav-train.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):  # it ended
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def wait_for(path, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def on_worker(script, env):
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=30)


def test_train_and_stop_commands_work_on_a_worker(worker):
    env, home = worker
    (ssh,) = dry_tpu("train", *TPU, *TRAIN_GS, "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b",
                     train=[*OVERRIDES, "--config.data.system_prompt=It's a test"])
    (stop,) = dry_tpu("stop", *TPU)

    unmounted = on_worker(remote(ssh), {**env, "FAKE_MOUNTED": "1"})
    assert unmounted.returncode == 1 and "/mnt/gcs is not mounted" in unmounted.stderr
    assert not (home / "lladav-train.pid").exists()

    started = time.monotonic()
    first = on_worker(remote(ssh), env)
    assert first.returncode == 0, first.stderr
    assert time.monotonic() - started < 10  # returned while the training runs on
    assert wait_for(home / "args").splitlines() == [
        str(home / "lladav-jax"), *TRAIN_GS, *OVERRIDES,
        "--config.data.system_prompt=It's a test"]
    environment = (home / "env").read_text().splitlines()
    assert "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b" in environment
    assert "PYTHONUNBUFFERED=1" in environment
    assert "JAX_COMPILATION_CACHE_DIR=gs://bkt/jax-cache" in environment
    pid = int((home / "lladav-train.pid").read_text())
    os.kill(pid, 0)  # running

    second = on_worker(remote(ssh), env)
    assert second.returncode == 1 and "lladav-train is running" in second.stderr

    stopped = on_worker(remote(stop), env)
    assert stopped.returncode == 0 and "SIGTERM sent" in stopped.stdout
    assert wait_for(home / "terminated").strip() == "TERM"


def test_logs_follow_worker_zero_or_all():
    (one,) = dry_tpu("logs", *TPU)
    assert one == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lla", "--zone=us-east5-a",
                   "--worker=0", "--command", 'tail -n 100 -F "$HOME/lladav-train.log"']
    (every,) = dry_tpu("logs", *TPU, "--worker", "all")
    assert "--worker=all" in every and "tail -n 20 -F" in remote(every)


def test_every_remote_command_is_valid_shell():
    cmds = [
        *dry_tpu("all", *TPU, "--accelerator", "v5p-8", "--bucket", "b", *TRAIN, train=OVERRIDES),
        *dry_tpu("setup", *TPU, "--bucket", "b", "--source", "git@github.com:o/l.git", "--ref",
                 "main", "--slices", "2"),
        *dry_tpu("logs", *TPU), *dry_tpu("logs", *TPU, "--worker", "all"), *dry_tpu("stop", *TPU)]
    scripts = [remote(c) for c in cmds if "--command" in c]
    assert len(scripts) == 6
    for script in scripts:
        proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stderr)


# --- status, delete --------------------------------------------------------------------------


def test_status_and_delete():
    assert dry_tpu("status", *TPU) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "lla", "--zone=us-east5-a"]]
    assert dry_tpu("delete", *TPU) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "lla", "--zone=us-east5-a", "--quiet"]]
    assert dry_tpu("delete", *TPU, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "lla", "--zone=us-east5-a",
         "--force", "--quiet"]]


# --- multislice ------------------------------------------------------------------------------


def test_multislice_is_one_queued_resource_of_n_nodes():
    cmds = dry_tpu("all", *TPU, "--accelerator", "v5p-64", "--slices", "4", "--spot",
                   "--bucket", "bkt", *TRAIN_GS, train=OVERRIDES)
    create, describe, tar, scp, setup, train = cmds
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "lla"]
    assert {"--accelerator-type=v5p-64", "--node-count=4", "--node-prefix=lla", "--spot"} <= \
        set(create)
    assert not any(a.startswith("--node-id") for a in create)
    assert describe[4] == "describe" and tar[0] == "tar"
    assert scp[:5] == ["gcloud", "compute", "tpus", "queued-resources", "scp"]
    for cmd in (setup, train):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "lla"]
    for cmd in (scp, setup, train):
        assert "--node=all" in cmd and "--worker=all" in cmd
    # The data axis spans the slices; the user's overrides come after, so they win.
    assert ("--workdir gs://bkt/runs/s2a --config.mesh.slices=4 --config.mesh.data=4 "
            "--config.data.path=") in remote(train)
    (logs,) = dry_tpu("logs", *TPU, "--slices", "4")
    assert "--node=0" in logs and "--worker=0" in logs
    (delete,) = dry_tpu("delete", *TPU, "--slices", "4")
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete


# --- dry run, real run -----------------------------------------------------------------------


def test_dry_run_runs_nothing_and_env_equals_flag(calls):
    args = ["all", *TPU, "--accelerator", "v5p-64", "--queued", "--bucket", "bkt", *TRAIN]
    by_flag = launch("tpu.sh", *args, "--dry-run").stdout
    by_env = launch("tpu.sh", *args, env={"DRY_RUN": "1"}).stdout
    assert by_flag == by_env and len(commands(by_flag)) == 6
    assert calls() == []
    assert not list(pathlib.Path(os.environ["TMPDIR"]).glob("lladav-src-*"))  # no tarball


def test_real_run_makes_the_printed_calls(calls):
    proc = launch("tpu.sh", "create", *TPU, "--accelerator", "v6e-16", "--queued")
    printed = commands(proc.stderr)
    assert [c[:5] for c in printed] == [
        ["gcloud", "compute", "tpus", "queued-resources", "create"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe"]]
    assert calls() == printed  # and the wait ended: the stand-in answered ACTIVE
