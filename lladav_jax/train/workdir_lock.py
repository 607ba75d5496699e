"""One trainer per workdir: `WORKDIR/trainer.lock`.

Two trainers on one workdir would write the same checkpoints and interleave their metrics
rows, so a run takes the workdir's lock before it writes anything there, and a second trainer
meets a message naming the holder (host, pid, job size, start) instead. On a pod the lock is
the job's, not a host's: process 0 takes it for all and the others follow its answer.

The holder rewrites the file every `heartbeat_s` seconds. A lock is stale, and the next
trainer takes it over (saying so), when its heartbeat is older than `stale_after_s`, or at
once when its holder was on this host and that process is gone (Ctrl-C'd twice, killed, a
crashed notebook). A preempted pod job restarts on new hosts minutes later, by which time the
old heartbeat is stale. On a local disk the lock is created atomically (O_EXCL); a bucket has
no such primitive through gcsfs, so there the file is written and read back, which leaves a
window of a second or so in which two trainers started together could both proceed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

import jax
import numpy as np

from lladav_jax import paths

LOCK_FILE = "trainer.lock"


class WorkdirBusyError(RuntimeError):
    """Another trainer holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` holds the workdir for this job (see the module doc)."""

    def __init__(self, workdir: str | os.PathLike, *, heartbeat_s: float = 30.0,
                 stale_after_s: float = 120.0):
        self.path = paths.as_path(workdir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- taking and giving back ----------------------------------------------------------
    def acquire(self) -> None:
        """Takes the lock (process 0 for the job), or raises WorkdirBusyError."""
        error = ""
        if jax.process_index() == 0:
            try:
                self._take()
            except WorkdirBusyError as e:
                error = str(e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            busy = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
            if busy and not error:
                error = f"{self.path.parent} is in use by another trainer (process 0 says why)"
        if error:
            raise WorkdirBusyError(error)
        if jax.process_index() == 0:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    def _take(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "processes": jax.process_count(), "token": uuid.uuid4().hex,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "heartbeat": time.time()}
        for _ in range(2):  # a second try after removing a stale lock
            if self._create():
                return
            holder = self._read()
            why_stale = self._stale(holder)
            if why_stale is None:
                raise WorkdirBusyError(self._busy_message(holder))
            print(f"taking over the stale lock {self.path} ({why_stale})", file=sys.stderr)
            self.path.unlink(missing_ok=True)
        raise WorkdirBusyError(self._busy_message(self._read()))

    def _create(self) -> bool:
        """Writes the record if no lock exists; False if one does."""
        text = json.dumps(self.record)
        if not paths.is_url(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        if self.path.exists():
            return False
        self.path.write_text(text)
        time.sleep(1.0)  # let a trainer that started at the same moment write too
        return self._read().get("token") == self.record["token"]

    def _read(self) -> dict:
        """The holder's record; {} if the file is gone or unreadable (being written)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> str | None:
        """Why the lock `holder` describes is stale; None if it is held."""
        if not holder:
            return None  # gone or being written at this moment: treated as held
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"])):
            return f"process {holder['pid']} on this host is gone"
        if age > self.stale_after_s:
            return f"no heartbeat from host {holder.get('host')} for {age:.0f} s"
        return None

    def _busy_message(self, holder: dict) -> str:
        if not holder:
            return (f"{self.path.parent} is being taken by another trainer at this moment "
                    f"({self.path}); wait for it, or use another --workdir")
        age = time.time() - float(holder.get("heartbeat", 0))
        return (f"{self.path.parent} is in use by another trainer: host {holder.get('host')}, "
                f"pid {holder.get('pid')}, {holder.get('processes')} process(es), started "
                f"{holder.get('started')}, alive {age:.0f} s ago. Stop that trainer or use "
                f"another --workdir; if it is gone, its lock goes stale after "
                f"{self.stale_after_s:.0f} s without a heartbeat (or remove {self.path})")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder and holder.get("token") != self.record["token"]:
                print(f"warning: {self.path} was taken over by host {holder.get('host')} pid "
                      f"{holder.get('pid')}; two trainers may now share this workdir",
                      file=sys.stderr)
                return
            self.record["heartbeat"] = time.time()
            try:
                self.path.write_text(json.dumps(self.record))
            except OSError as e:  # a storage hiccup: the next beat tries again
                print(f"warning: could not refresh {self.path}: {e}", file=sys.stderr)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still this trainer's."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._read().get("token") == self.record.get("token"):
            self.path.unlink(missing_ok=True)

