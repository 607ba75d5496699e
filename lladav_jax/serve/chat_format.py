"""The OpenAI chat-completions wire format: a request body -> `ChatRequest`, answers -> bodies.

    {"model": "lladav", "messages": [
        {"role": "system", "content": "Answer in one word."},                     # optional
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                     {"type": "text", "text": "What shape is this?"}]},
        {"role": "assistant", "content": "A circle."},                             # earlier turns
        {"role": "user", "content": "What color is it?"}],
     "max_tokens": 32, "stream": false, "steps": 32, "cache": "dual"}             # sampler extras

A user message becomes a human turn whose parts are joined by newlines, each image part an
`<image>` tag in its place (so [image, text] reads "<image>\\nQuestion", as `lladav-generate`
writes a question about one image); the images of all messages, in order, are the prompt's.
Images are data URLs (base64) or local paths (`file://` or plain); nothing is fetched from the
network. Every fault is a `RequestError` with the HTTP status and a message naming it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

from lladav_jax.data.template import IMAGE_TAG
from lladav_jax.diffusion.options import SamplerOptions

ROLES = {"user": "human", "assistant": "gpt"}
# OpenAI fields we take, beside the sampler's options (extra body fields).
OPENAI_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "stream", "seed",
                 "temperature", "n", "user", "stream_options")
MAX_IMAGE_BYTES = 20 * 2**20  # an encoded image larger than this is refused (413)


class RequestError(Exception):
    """A request the server will not take: `status` (4xx) and a message naming the fault."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat-completions request, parsed: the prompt as `Model.prepare` takes it."""

    images: list[bytes | str]  # encoded bytes (data URLs) or local paths, in prompt order
    turns: list[dict[str, str]]  # LLaVA turns, human first and last
    system: str | None  # None: the model's
    options: dict[str, Any]  # sampler options given (max_tokens as gen_length)
    seed: int | None  # None: the server's
    stream: bool
    model: str


def parse(body: Any, max_image_bytes: int = MAX_IMAGE_BYTES) -> ChatRequest:
    """A request body (decoded JSON) -> ChatRequest, or RequestError naming the fault."""
    if not isinstance(body, Mapping):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(OPENAI_FIELDS) - set(SamplerOptions.defaults()))
    if unknown:
        raise RequestError(400, f"unknown setting(s) {unknown}: this server takes the OpenAI "
                           f"fields {list(OPENAI_FIELDS)} and the sampler's options "
                           f"{list(SamplerOptions.defaults())}")
    if body.get("n", 1) != 1:
        raise RequestError(400, f"n={body['n']!r}: one answer per request (n=1)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of chat messages")
    system, turns, images = None, [], []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise RequestError(400, f"messages[{i}] must be an object with a 'role'")
        role = message["role"]
        if role == "system":
            if i:
                raise RequestError(400, f"messages[{i}]: a system message comes first, or none")
            system = _text_only(message.get("content"), f"messages[{i}]")
            continue
        if role not in ROLES:
            raise RequestError(400, f"messages[{i}]: role {role!r}; this server takes system, "
                               "user and assistant messages")
        value, found = _content(message.get("content"), f"messages[{i}]", max_image_bytes)
        if found and role != "user":
            raise RequestError(400, f"messages[{i}]: images go in user messages")
        images += found
        turns.append({"from": ROLES[role], "value": value})
    expected = ["human" if k % 2 == 0 else "gpt" for k in range(len(turns))]
    if [t["from"] for t in turns] != expected or len(turns) % 2 == 0:
        raise RequestError(400, "after the system message, messages must alternate user, "
                           "assistant, ..., and end with a user message; got roles "
                           f"{[m.get('role') for m in messages]}")
    options = {k: body[k] for k in SamplerOptions.defaults() if k in body}
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None:
        if "gen_length" in options and options["gen_length"] != tokens:
            raise RequestError(400, f"max_tokens {tokens} and gen_length "
                               f"{options['gen_length']} disagree: give one")
        options["gen_length"] = tokens
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not 0 <= seed < 2**32):
        raise RequestError(400, f"seed={seed!r}: must be an integer in [0, 2**32)")
    return ChatRequest(images, turns, system, options, seed, bool(body.get("stream", False)),
                       str(body.get("model", "")))


def _text_only(content: Any, where: str) -> str:
    value, images = _content(content, where, 0)
    if images:
        raise RequestError(400, f"{where}: a system message holds text only")
    return value


def _content(content: Any, where: str, max_image_bytes: int) -> tuple[str, list]:
    """A message's content -> (turn text with <image> tags, its images)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise RequestError(400, f"{where}: 'content' must be a string or a non-empty list of "
                           "parts")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            images.append(_image(url, f"{where}.content[{j}]", max_image_bytes))
            texts.append(IMAGE_TAG)
        else:
            raise RequestError(400, f"{where}.content[{j}]: parts are {{'type': 'text', "
                               "'text': ...}} or {'type': 'image_url', 'image_url': {'url': "
                               "...}}")
    return "\n".join(texts), images


def _image(url: Any, where: str, max_bytes: int) -> bytes | str:
    """A data URL's bytes, or a local path (checked to exist)."""
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: image_url needs a 'url' string")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(400, f"{where}: a data URL must be base64 (data:image/...;base64,)")
        if len(data) * 3 // 4 > max_bytes:
            raise RequestError(413, f"{where}: the image is over {max_bytes} bytes")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"{where}: the data URL is not valid base64 ({e})") from None
    if url.startswith(("http://", "https://")):
        raise RequestError(400, f"{where}: this server fetches nothing from the network; send "
                           "the image as a data URL or a path on the server")
    path = url.removeprefix("file://")
    if not os.path.isfile(path):
        raise RequestError(400, f"{where}: no image file at {path!r} on the server")
    if os.path.getsize(path) > max_bytes:
        raise RequestError(413, f"{where}: the image {path!r} is over {max_bytes} bytes")
    return path


def completion(request_id: str, model: str, text: str, prompt_tokens: int,
               answer_tokens: int, finish_reason: str) -> dict[str, Any]:
    """A chat.completion body."""
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": answer_tokens,
                  "total_tokens": prompt_tokens + answer_tokens},
    }


def chunk(request_id: str, model: str, delta: dict[str, str],
          finish_reason: str | None = None) -> dict[str, Any]:
    """A chat.completion.chunk body (one server-sent event of a stream)."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def error(message: str, status: int) -> dict[str, Any]:
    """An error body as OpenAI's API writes one."""
    kind = {429: "rate_limit_exceeded", 504: "timeout"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
