"""One trainer per workdir: a second one meets the holder's name; stale locks are taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from lladav_jax.train.loop import train
from lladav_jax.train.workdir_lock import LOCK_FILE, WorkdirBusyError, WorkdirLock
from tests.train.test_train import small_config

HOLD = '''
import sys, time
from lladav_jax.train.workdir_lock import WorkdirLock

with WorkdirLock(sys.argv[1], heartbeat_s=0.2):
    print("held", flush=True)
    time.sleep(600)
'''


def test_a_second_holder_is_told_who_holds_it_and_the_lock_is_released(tmp_path):
    with WorkdirLock(tmp_path, heartbeat_s=0.05):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(WorkdirBusyError) as e:
            WorkdirLock(tmp_path).acquire()
        assert f"{tmp_path} is in use by another trainer: host {socket.gethostname()}, pid " \
               f"{os.getpid()}" in str(e.value)
        time.sleep(0.3)
        later = json.loads((tmp_path / LOCK_FILE).read_text())
        assert later["heartbeat"] > record["heartbeat"]  # the holder shows it is alive
    assert not (tmp_path / LOCK_FILE).exists()


def write_lock(workdir, **fields) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "processes": 1,
              "token": "other", "started": "earlier", "heartbeat": time.time(), **fields}
    (workdir / LOCK_FILE).write_text(json.dumps(record))


def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path, capfd):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    write_lock(tmp_path, pid=int(gone))  # this host, a process that is gone
    with WorkdirLock(tmp_path):
        pass
    assert f"process {gone} on this host is gone" in capfd.readouterr().err

    write_lock(tmp_path, host="tpu-vm-7", pid=1, heartbeat=time.time() - 300)
    with WorkdirLock(tmp_path):
        pass
    assert "no heartbeat from host tpu-vm-7 for 300 s" in capfd.readouterr().err

    write_lock(tmp_path, host="tpu-vm-7", pid=1)  # another host, heartbeat fresh: held
    with pytest.raises(WorkdirBusyError, match="host tpu-vm-7, pid 1"):
        WorkdirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "other"


def test_a_second_trainer_stops_before_writing_anything(tmp_path):
    """A trainer (here a process holding the lock as a trainer does) has the workdir: a
    second one fails at once, naming it, and writes nothing; once the first is killed, the
    lock is stale and the next run trains."""
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusyError, match=f"pid {holder.pid}"):
            train(small_config({"train.steps": 1}), str(workdir))
        assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    summary = train(small_config({"train.steps": 1}), str(workdir))
    assert summary["step"] == 1
    assert not (workdir / LOCK_FILE).exists()
