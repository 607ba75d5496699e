"""launch/slurm.sh and launch/slurm_gpu.sbatch: submit and start exactly the commands they mean.

`sbatch`, `srun` (and the other commands the scripts run) are stand-ins that record their
arguments (conftest.py).
"""

import os
import pathlib
import shutil
import subprocess

from tests.launch.helpers import LAUNCH, OVERRIDES, REPO, TRAIN, commands, dry, launch


def test_slurm_submit(calls):
    args = ["submit", "--nodes", "4", "--time=2-00:00:00", "--partition", "gpu"]
    mkdir, sbatch = commands(launch("slurm.sh", *args, "--dry-run", "--", *TRAIN, *OVERRIDES
                                    ).stdout)
    assert calls() == []
    assert mkdir == ["mkdir", "-p", str(LAUNCH / "logs")]
    script = sbatch.index(str(LAUNCH / "slurm_gpu.sbatch"))
    assert sbatch[0] == "sbatch"
    assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=2-00:00:00",
            "--partition=gpu", f"--export=ALL,LLADAV_REPO={REPO}"} <= set(sbatch[1:script])
    assert sbatch[script + 1:] == [*TRAIN, *OVERRIDES]
    # Outside a dry run: the same calls.
    proc = launch("slurm.sh", *args, "--", *TRAIN, *OVERRIDES)
    assert calls() == commands(proc.stderr) == [mkdir, sbatch]


def test_sbatch_directives():
    lines = (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines()
    # sbatch reads #SBATCH lines only up to the first command.
    first_command = next(i for i, line in enumerate(lines)
                         if line.strip() and not line.startswith("#"))
    directives = [line for line in lines[:first_command] if line.startswith("#SBATCH")]
    assert {"#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive",
            "#SBATCH --signal=TERM@300"} <= set(directives)
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])


def test_sbatch_dry_run_installs_then_starts_one_process_per_gpu(tmp_path):
    venv = tmp_path / "venv"
    env = {"LLADAV_VENV": str(venv), "PYTHON": "python3.12",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "", "JAX_COMPILATION_CACHE_DIR": ""}
    cmds = dry("slurm_gpu.sbatch", *TRAIN, *OVERRIDES, env=env)
    assert cmds == [
        ["python3.12", "-m", "venv", str(venv)],
        [f"{venv}/bin/pip", "install", "-q", "-e", f"{REPO}[gpu]"],
        ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"],
        ["export", "PYTHONUNBUFFERED=1"],
        ["export", f"JAX_COMPILATION_CACHE_DIR={LAUNCH}/.jax-cache"],
        ["cd", str(REPO)],
        ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none", f"{venv}/bin/lladav-train",
         *TRAIN, *OVERRIDES]]


def test_sbatch_runs_srun_with_the_environment(calls, tmp_path):
    """As sbatch runs it: a copy in a spool directory, the checkout found from the submit
    directory, the virtualenv already there."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "lladav-train").write_text("#!/bin/sh\n")
    (venv_bin / "lladav-train").chmod(0o755)
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(LAUNCH / "slurm_gpu.sbatch", spool / "slurm_script")
    env = {**os.environ, "LLADAV_VENV": str(tmp_path / "venv"), "SLURM_SUBMIT_DIR": str(REPO),
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.8", "JAX_COMPILATION_CACHE_DIR": ""}
    proc = subprocess.run(["bash", str(spool / "slurm_script"), *TRAIN], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert calls() == [["srun", "--kill-on-bad-exit=1", "--gpu-bind=none",
                        str(venv_bin / "lladav-train"), *TRAIN]]
    srun_env = pathlib.Path(env["FAKE_LOG"] + ".srun-env").read_text().splitlines()
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8" in srun_env  # the user's value is kept
    assert f"JAX_COMPILATION_CACHE_DIR={LAUNCH}/.jax-cache" in srun_env

    lost = subprocess.run(["bash", str(spool / "slurm_script"), *TRAIN],
                          env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert lost.returncode == 2 and "LLADAV_REPO" in lost.stderr
