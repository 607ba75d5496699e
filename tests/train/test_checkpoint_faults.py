"""Faults around checkpoints: killed (-9) while an asynchronous checkpoint is being written,
and a latest checkpoint that does not restore. Neither loses the checkpoints before it."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from lladav_jax.train.checkpoint import CheckpointError
from lladav_jax.train.loop import train
from tests.train import test_train as runs
from tests.train.test_train import (
    STEPS,
    assert_one_row_per_step,
    command,
    losses,
    rows_of,
    run,
    small_config,
)

# The trainer tests' fixtures: the reference run A, its config file and environment.
run_a, config_file, env = runs.run_a, runs.config_file, runs.env

# Runs the trainer with the commit of one checkpoint held back: Orbax calls `finalize` once
# every item is written, just before the checkpoint is committed (renamed into place), the
# last moment a kill can hit a save.
HOLD_FINALIZE = '''
import sys, time
from orbax.checkpoint._src.handlers import composite_checkpoint_handler as composite

step = sys.argv.pop(1)
finalize = composite.CompositeCheckpointHandler.finalize


def held(self, directory):
    if directory.name.split(".")[0] == step:
        print(f"FINALIZING {directory}", flush=True)
        time.sleep(600)
    return finalize(self, directory)


composite.CompositeCheckpointHandler.finalize = held
from lladav_jax.cli.train import main

main()
'''


def steps_of(workdir: pathlib.Path) -> list[int]:
    return list(ocp.CheckpointManager(workdir / "checkpoints").all_steps())


@pytest.mark.slow
def test_kill_9_during_an_async_save_keeps_the_previous_checkpoint(run_a, config_file, env,
                                                                   tmp_path):
    workdir, script = tmp_path / "run", tmp_path / "hold.py"
    script.write_text(HOLD_FINALIZE)
    cmd = command(config_file, workdir, entry=(sys.executable, str(script), str(STEPS)))
    with open(tmp_path / "out.log", "w") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while "FINALIZING" not in (tmp_path / "out.log").read_text():
                assert p.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "out.log").read_text()[-5000:])
                time.sleep(0.1)
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
    ckpts = workdir / "checkpoints"
    assert STEPS not in steps_of(workdir) and max(steps_of(workdir)) == 4
    assert any(d.name.startswith(f"{STEPS}.") for d in ckpts.iterdir())  # the unfinished one
    out = run(command(config_file, workdir), env)
    assert "resumed from step 4" in out
    assert_one_row_per_step(workdir)
    assert losses(workdir) == losses(run_a)  # bitwise: as if nothing had happened
    assert STEPS in steps_of(workdir)


@pytest.mark.slow
def test_a_latest_checkpoint_that_does_not_restore_is_named_and_the_one_before_used(tmp_path,
                                                                                   capfd):
    workdir = tmp_path / "run"
    config = small_config()
    train(config, str(workdir))
    reference = losses(workdir)
    data = workdir / "checkpoints" / str(STEPS) / "params" / "ocdbt.process_0" / "d"
    for f in data.iterdir():  # the parameter data of the latest checkpoint goes missing
        f.unlink()
    capfd.readouterr()

    # Told to fail: the message names the checkpoint and the way out; nothing is moved.
    failing = small_config({"train.on_bad_checkpoint": "fail"})
    with pytest.raises(CheckpointError, match=f"checkpoints/{STEPS} does not restore") as e:
        train(failing, str(workdir))
    assert "on_bad_checkpoint=fallback" in str(e.value)
    assert STEPS in steps_of(workdir) and not (workdir / "checkpoints" / f"bad-{STEPS}").exists()

    # By default: named, moved aside (kept), resumed from the one before, the same losses.
    train(config, str(workdir))
    err = capfd.readouterr().err
    assert f"checkpoints/{STEPS} does not restore" in err and f"bad-{STEPS}" in err
    assert (workdir / "checkpoints" / f"bad-{STEPS}" / "params").is_dir()
    assert rows_of(workdir)[-1]["step"] == STEPS
    assert losses(workdir) == reference
    assert STEPS in steps_of(workdir)


@pytest.mark.slow
def test_no_checkpoint_that_restores_is_an_error(tmp_path):
    workdir = tmp_path / "run"
    train(small_config({"train.steps": 1}), str(workdir))
    shutil.rmtree(workdir / "checkpoints" / "1" / "params")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores: step 1"):
        train(small_config({"train.steps": 1}), str(workdir))
    assert steps_of(workdir) == [1]
