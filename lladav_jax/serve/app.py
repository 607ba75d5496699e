"""The HTTP side: FastAPI routes of the OpenAI chat API over a `Batcher`.

    POST /v1/chat/completions   chat_format's requests; `stream: true` sends one server-sent
                                event per decoded block, then `data: [DONE]`
    GET  /v1/models             the one model served
    GET  /health                queue length, batches decoded, XLA compiles since the warm-up,
                                images encoded and reused (inference/features.py)

A request is parsed and its images decoded off the event loop; a fault is a 4xx naming it
(chat_format.RequestError, or the model's own ValueError: an unreadable image, a prompt longer
than the model takes), 429 when the queue is full, 504 past `timeout_s`. A client that goes
away (a closed stream, a cancelled request) is marked cancelled: it leaves the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from lladav_jax.inference.api import Model, text_delta
from lladav_jax.serve import chat_format
from lladav_jax.serve.batcher import Batcher, Job, QueueFull
from lladav_jax.serve.chat_format import RequestError

POLL_S = 0.25  # how often a waiting request checks that its client is still there


def create_app(model: Model, batcher: Batcher, name: str = "lladav", timeout_s: float = 600.0,
               defaults: dict[str, Any] | None = None, seed: int = 0) -> FastAPI:
    """The server's app; the batcher is warmed up and started by the caller (`cli/serve.py`).
    `defaults`: sampler options of requests that do not set them (over the model's); `seed`:
    of requests without one."""
    defaults = dict(defaults or {})
    app = FastAPI(title="lladav-serve")

    @app.exception_handler(RequestError)
    async def refused(_request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(chat_format.error(e.message, e.status), status_code=e.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "waiting": batcher.waiting,
                "batches": batcher.batches, "rows_decoded": batcher.rows_decoded,
                "dropped": batcher.dropped,
                "compiles_after_warm_up": batcher.compiles_after_warm_up,
                # The vision tower's runs, and the times a conversation's images reused them.
                "image_encodes": model.feature_cache.encodes,
                "image_reuses": model.feature_cache.hits}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model",
                                            "owned_by": "lladav-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        with batcher.arriving():  # a batch waits for requests still being read
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the request body is not JSON ({e})") from None
            req = chat_format.parse(body)
            job, events = await _admit(model, batcher, req, {**defaults, **req.options},
                                       seed if req.seed is None else req.seed, timeout_s)
        rid = chat_format.new_id()
        if req.stream:
            return StreamingResponse(_stream(request, job, events, rid, name),
                                     media_type="text/event-stream")
        kind, payload = await _final(events, job, request)
        if kind == "gone":
            return JSONResponse(chat_format.error("the client went away", 499), status_code=499)
        if kind == "error":
            raise RequestError(*payload)
        text, ids, finish = payload
        return chat_format.completion(rid, name, text, len(job.prompt.tokens), len(ids), finish)

    return app


async def _admit(model: Model, batcher: Batcher, req: chat_format.ChatRequest,
                 options: dict[str, Any], seed: int,
                 timeout_s: float) -> tuple[Job, asyncio.Queue]:
    """The request's job, queued; its events arrive on the returned asyncio queue."""
    try:
        options = model.options(**options)
    except (TypeError, ValueError) as e:
        raise RequestError(400, str(e)) from None
    images = req.images[0] if len(req.images) == 1 else (req.images or None)
    try:
        prompt = await run_in_threadpool(model.prepare, images, req.turns, options, req.system)
    except ValueError as e:  # unreadable images (ImageLoadError), too long, too many turns
        raise RequestError(400, str(e)) from None
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def deliver(kind: str, payload: Any) -> None:  # from the worker thread
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody listens
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

    job = Job(prompt, options, seed, deliver, deadline=time.monotonic() + timeout_s)
    try:
        batcher.submit(job)
    except QueueFull as e:
        raise RequestError(429, str(e)) from None
    return job, events


async def _next(events: asyncio.Queue, job: Job, request: Request) -> tuple[str, Any]:
    """The job's next event; ("error", 504) once past its deadline, ("gone", None) once the
    client has disconnected (then the job is cancelled: it leaves the queue)."""
    while True:
        left = job.deadline - time.monotonic()
        if left <= 0:
            job.cancelled = True
            return "error", (504, "no answer within the server's timeout")
        try:  # a client's disconnect does not cancel the handler: look every POLL_S
            return await asyncio.wait_for(events.get(), min(left, POLL_S))
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                return "gone", None


async def _final(events: asyncio.Queue, job: Job, request: Request) -> tuple[str, Any]:
    """The job's last event ("done", "error" or "gone"), its blocks skipped."""
    while True:
        kind, payload = await _next(events, job, request)
        if kind != "block":
            return kind, payload


async def _stream(request: Request, job: Job, events: asyncio.Queue, rid: str,
                  name: str) -> AsyncIterator[str]:
    """Server-sent events: the role, then each block's new text, then the finish reason."""
    sse = lambda body: f"data: {json.dumps(body)}\n\n"
    yield sse(chat_format.chunk(rid, name, {"role": "assistant", "content": ""}))
    sent = ""
    try:
        while True:
            kind, payload = await _next(events, job, request)
            if kind == "gone":
                return
            if kind == "error":
                yield sse(chat_format.error(payload[1], payload[0]))
                break
            # Each block's text extends the last (earlier blocks are final).
            text = payload.text if kind == "block" else payload[0]
            delta = text_delta(sent, text, final=kind == "done")
            if delta:
                yield sse(chat_format.chunk(rid, name, {"content": delta}))
                sent += delta
            if kind == "done":
                yield sse(chat_format.chunk(rid, name, {}, payload[2]))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not job.finished:
            job.cancelled = True  # the client closed the stream

