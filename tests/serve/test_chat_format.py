"""The OpenAI wire format without a server: messages -> LLaVA turns and images, faults by name;
the batch shapes a server compiles."""

from __future__ import annotations

import base64

import pytest

from lladav_jax.serve.batcher import Shapes
from lladav_jax.serve.chat_format import RequestError, parse


def url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_messages_become_turns_images_and_options(tmp_path):
    path = tmp_path / "b.png"
    path.write_bytes(b"png")
    req = parse({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url(b"a")}},
                                     {"type": "text", "text": "Color?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "And this one"},
                                     {"type": "image_url", "image_url": {"url": f"file://{path}"}},
                                     {"type": "text", "text": "?"}]}],
        "max_tokens": 16, "steps": 8, "cache": "dual", "seed": 3, "stream": True})
    assert req.system == "Be brief." and req.images == [b"a", str(path)]
    assert req.turns == [{"from": "human", "value": "<image>\nColor?"},
                         {"from": "gpt", "value": "Red."},
                         {"from": "human", "value": "And this one\n<image>\n?"}]
    assert req.options == {"gen_length": 16, "steps": 8, "cache": "dual"}
    assert (req.seed, req.stream, req.model) == (3, True, "m")
    assert parse({"messages": [{"role": "user", "content": "Hi"}]}).seed is None


@pytest.mark.parametrize(("body", "status", "words"), [
    ([], 400, "JSON object"),
    ({"messages": "hi"}, 400, "non-empty list"),
    ({"messages": [{"content": "hi"}]}, 400, "'role'"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "role 'tool'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400,
     "system message comes first"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "end with a user message"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "parts are"),
    ({"messages": [{"role": "user", "content": []}]}, 400, "non-empty list of parts"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": url(b"x")}}]},
        {"role": "user", "content": "a"}]}, 400, "images go in user messages"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]}, 400, "base64"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, 400,
     "not valid base64"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/no/such.png"}}]}]}, 400, "/no/such.png"),
    ({"messages": [{"role": "user", "content": "a"}], "n": 2}, 400, "n=2"),
    ({"messages": [{"role": "user", "content": "a"}], "seed": -1}, 400, "seed=-1"),
    ({"messages": [{"role": "user", "content": "a"}], "top_p": 0.9}, 400, "['top_p']"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 8, "gen_length": 16}, 400,
     "disagree"),
])
def test_faults_are_named(body, status, words):
    with pytest.raises(RequestError) as e:
        parse(body)
    assert e.value.status == status and words in e.value.message, e.value.message


def test_an_image_over_the_limit_is_413():
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url(b"x" * 300)}}]}]}
    with pytest.raises(RequestError) as e:
        parse(body, max_image_bytes=200)
    assert e.value.status == 413


def test_shapes_fit_the_smallest_compiled_batch():
    shapes = Shapes((1, 4, 16, 32), (128, 1024))
    assert shapes.fit(1, 100) == (1, 128)
    assert shapes.fit(5, 129) == (16, 1024)
    assert shapes.fit(32, 1024) == (32, 1024)
    assert shapes.fit(3, 2000) is None  # longer than every compiled length: its own
