"""What the launch/ tests share: the stand-in commands, and running a script (for real or as a
dry run) and reading back the commands it printed."""

import os
import pathlib
import shlex
import shutil
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = ["common.sh", "tpu.sh", "slurm.sh", "slurm_gpu.sbatch"]
TPU = ["--name", "lla", "--zone", "us-east5-a"]
TRAIN = ["--config", "configs/stage2a.py", "--workdir", "/mnt/gcs/runs/s2a"]  # a shared directory
TRAIN_GS = ["--config", "configs/stage2a.py", "--workdir", "gs://bkt/runs/s2a"]  # in a bucket
OVERRIDES = ["--config.data.path=/mnt/gcs/data/*", "--config.init_from=/mnt/gcs/stage1"]
SEP = "\x1f"

# Records one call per line: the program's name and its arguments, separated by SEP.
RECORD = """#!/usr/bin/env bash
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\\037%s' "$a"; done; echo; } \\
    >> "$FAKE_LOG"
"""
STAND_INS = {
    "gcloud": RECORD + 'case "$*" in *describe*state.state*) echo ACTIVE ;; esac\n',
    "sbatch": RECORD,
    "srun": RECORD + 'env > "$FAKE_LOG.srun-env"\n',
    "python3.12": RECORD,
    "mkdir": RECORD,
    # tar records, then does its work: a real run's tarball is checked.
    "tar": RECORD + f'exec {shutil.which("tar")} "$@"\n',
}


def launch(script, *args, env=None, check=True):
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(text):
    """The "+ " lines of a run, as argument lists."""
    return [shlex.split(line[2:]) for line in text.splitlines() if line.startswith("+ ")]


def dry(script, *args, env=None):
    """The commands of a dry run by DRY_RUN=1 (flags after `--` would be lladav-train's);
    checks that it ran none of them."""
    cmds = commands(launch(script, *args, env={**(env or {}), "DRY_RUN": "1"}).stdout)
    log = pathlib.Path(os.environ["FAKE_LOG"])
    assert log.read_text() == "", "a dry run ran a command"
    return cmds


def dry_tpu(*args, train=()):
    """A dry run by --dry-run (before the training arguments)."""
    cmds = commands(launch("tpu.sh", *args, "--dry-run", "--", *train).stdout)
    assert pathlib.Path(os.environ["FAKE_LOG"]).read_text() == "", "a dry run ran a command"
    return cmds


def remote(cmd):
    """The --command of a gcloud ssh call."""
    return cmd[cmd.index("--command") + 1]
