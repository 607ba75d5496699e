"""Running the app: in the foreground (`lladav-serve`), or in a thread for a notebook or a test.

    with running(model, batcher) as url:          # warmed up, listening on 127.0.0.1
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from lladav_jax.inference.api import Model
from lladav_jax.serve.app import create_app
from lladav_jax.serve.batcher import Batcher

log = logging.getLogger("lladav.serve")


def _ready(batcher: Batcher) -> None:
    if batcher.warm_compiles is None:
        seconds = batcher.warm_up()
        log.info("warm-up: %d batch shapes compiled in %.1f s",
                 len(batcher.shapes.rows) * len(batcher.shapes.prompt_lengths), seconds)
    batcher.start()


def serve(model: Model, batcher: Batcher, name: str, host: str, port: int,
          **app_options: Any) -> None:
    """Warm up, then serve until interrupted (Ctrl-C, SIGTERM)."""
    _ready(batcher)
    try:
        uvicorn.run(create_app(model, batcher, name, **app_options), host=host, port=port,
                    log_level="info")
    finally:
        batcher.stop()


@contextlib.contextmanager
def running(model: Model, batcher: Batcher, name: str = "lladav", host: str = "127.0.0.1",
            **app_options: Any) -> Iterator[str]:
    """The server in a thread on a free port of `host`; yields its base URL, stops after."""
    _ready(batcher)
    sock = socket.socket()
    sock.bind((host, 0))
    config = uvicorn.Config(create_app(model, batcher, name, **app_options), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server stopped while starting (see its log)")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        batcher.stop()  # first: what waits is answered 503 while the event loop still runs
        server.should_exit = True
        thread.join()
        sock.close()
