"""lladav-serve's engine through the real `openai` client: the same answers as `generate`,
alone or in a batch of 32, streamed block by block, a conversation's image encoded once, bad
requests refused by name while the others are served, a full queue answered 429, a departed
client's row freed. A random `tiny` model; one server (warmed up once) for the module."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from lladav_jax.inference import api
from lladav_jax.serve.batcher import Batcher, Shapes
from lladav_jax.serve.server import running
from tests.tiny_model import random_model_dir

OPTIONS = dict(gen_length=16, steps=8, block_length=8)  # two blocks: streams have two parts
ROWS, PROMPT = [1, 8, 32], [256]


def png(seed: int, size: int = 56) -> bytes:
    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def image_part(data: bytes) -> dict:
    return {"type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def ask(image: bytes | None, question: str) -> list[dict]:
    parts = ([image_part(image)] if image is not None else []) + [{"type": "text",
                                                                   "text": question}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return api.load(random_model_dir(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def server(model):
    options = model.options(**OPTIONS)
    batcher = Batcher(model, options, Shapes.for_model(model, options, 32, ROWS, PROMPT))
    with running(model, batcher, defaults=OPTIONS) as url:
        yield url, batcher


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def test_openai_client_answers_as_generate(client, model, tmp_path):
    """Data URLs and paths on the server; the sampler's options as extra body fields; a
    system message; a multi-turn conversation; temperature > 0 with a seed."""
    path = tmp_path / "a.png"
    path.write_bytes(png(1))
    reply = client.chat.completions.create(model="x", messages=ask(png(1), "What shape?"))
    assert reply.choices[0].message.content == model.generate(png(1), "What shape?", **OPTIONS)
    assert reply.usage.completion_tokens == len(
        model.generate(png(1), "What shape?", return_details=True, **OPTIONS).ids)
    by_path = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(path)}},
        {"type": "text", "text": "What shape?"}]}]
    assert client.chat.completions.create(model="x", messages=by_path).choices[0] \
        .message.content == reply.choices[0].message.content
    settings = dict(steps=16, cache="dual", threshold=0.9, temperature=1.0, seed=7)
    turns = [{"role": "system", "content": "Be brief."}, *ask(png(2), "Color?"),
             {"role": "assistant", "content": "Red."},
             {"role": "user", "content": "And its shape?"}]
    got = client.chat.completions.create(
        model="x", messages=turns, max_tokens=16, seed=7,
        extra_body={k: v for k, v in settings.items() if k != "seed"})
    llava = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "And its shape?"}]
    want = model.generate(png(2), llava, system="Be brief.",
                          **{**OPTIONS, **settings})
    assert got.choices[0].message.content == want


def test_a_conversation_encodes_its_image_once(server, client):
    """Three turns about one image: the vision tower runs for the first only (the answers
    equal the tower run afresh: tests/inference/test_features.py)."""
    url = server[0]
    start = httpx.get(url + "/health").json()
    messages = ask(png(50), "What shape?")
    for question in ("And its color?", "Where is it?", None):
        reply = client.chat.completions.create(model="x", messages=messages)
        if question:
            messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": question}]
    health = httpx.get(url + "/health").json()
    assert health["image_encodes"] == start["image_encodes"] + 1
    assert health["image_reuses"] == start["image_reuses"] + 2


def test_32_concurrent_clients_answer_as_alone_without_a_compile(server, client, model):
    url, batcher = server
    before, compiled = batcher.batches, batcher.compiles_after_warm_up  # other tests' own
    questions = [(png(100 + i), f"What is shape number {i}?") for i in range(32)]

    def one(q):
        return client.chat.completions.create(model="x", messages=ask(*q)).choices[0] \
            .message.content

    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, questions))
    health = httpx.get(url + "/health").json()
    assert health["compiles_after_warm_up"] == compiled, health
    assert batcher.batches - before < 32  # they were decoded together
    assert answers == [model.generate(image, q, **OPTIONS) for image, q in questions]


def test_streaming_sends_each_block_in_order(client, model):
    blocks = []
    want = model.generate(png(3), "Stream?", on_block=lambda b: blocks.append(b.text),
                          **OPTIONS)
    stream = client.chat.completions.create(model="x", messages=ask(png(3), "Stream?"),
                                            stream=True)
    chunks = list(stream)
    parts = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(parts) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Each part is what its block added (a character cut by a block's end waits).
    shown, expected = "", []
    for text in [*(b.rstrip("\ufffd") for b in blocks[:-1]), want]:
        if text.startswith(shown) and text != shown:
            expected.append(text[len(shown):])
            shown = text
    assert parts == expected


def post(url: str, body) -> httpx.Response:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(url + "/v1/chat/completions", timeout=120, **kwargs)


def test_bad_requests_are_refused_by_name_amid_a_load(server, client, model, tmp_path):
    url, _ = server
    broken = tmp_path / "broken.png"
    broken.write_bytes(png(4)[:60])
    bad = {
        "messages": ({"messages": []}, 400, "'messages' must be a non-empty list"),
        "unknown setting": ({"messages": ask(None, "Hi"), "top_k": 3}, 400, "['top_k']"),
        "option out of range": ({"messages": ask(None, "Hi"), "steps": 7}, 400, "steps=7"),
        "unreadable image": ({"messages": ask(b"not an image", "Hi")}, 400, "cannot"),
        "truncated file": ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(broken)}}]}]}, 400, "broken.png"),
        "from the network": ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}, 400,
            "fetches nothing"),
        "too long": ({"messages": ask(None, "word " * 3000)}, 400, "maximum of 2048"),
        "roles": ({"messages": [{"role": "assistant", "content": "Hi"}]}, 400, "alternate"),
        "not JSON": (b"{nope", 400, "not JSON"),
    }
    questions = [(png(200 + i), f"Load {i}?") for i in range(12)]
    with cf.ThreadPoolExecutor(16) as pool:
        good = [pool.submit(lambda q: client.chat.completions.create(
            model="x", messages=ask(*q)).choices[0].message.content, q) for q in questions]
        refused = {name: pool.submit(post, url, body) for name, (body, _, _) in bad.items()}
        answers = [f.result() for f in good]
        for name, (_, status, words) in bad.items():
            r = refused[name].result()
            assert r.status_code == status, (name, r.text)
            assert words in r.json()["error"]["message"], (name, r.text)
    assert answers == [model.generate(image, q, **OPTIONS) for image, q in questions]
    big = post(url, {"messages": ask(b"x" * (21 * 2**20), "Hi")})
    assert big.status_code == 413 and "bytes" in big.json()["error"]["message"]


def test_full_queue_429_timeout_504_and_a_departed_client_freed(model):
    """A window long enough that requests wait in the queue: with room for one, a second
    is refused; a request past its timeout gets 504; a client that leaves is dropped before
    its batch runs."""
    options = model.options(**OPTIONS)
    batcher = Batcher(model, options, Shapes.for_model(model, options, 2, [1, 2], PROMPT),
                      window_s=2.0, gap_s=2.0, queue_size=1)
    with running(model, batcher, defaults=OPTIONS, timeout_s=1.0) as url:
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, url, {"messages": ask(None, "First?")})
            time.sleep(0.5)
            second = post(url, {"messages": ask(None, "Second?")})
            assert second.status_code == 429, second.text
            assert "queue" in second.json()["error"]["message"]
            r = first.result()
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"], r.text
        time.sleep(1.5)  # its window over, the worker has dropped it: the queue has room
        with pytest.raises(httpx.TimeoutException):  # the client gives up and leaves
            httpx.post(url + "/v1/chat/completions", json={"messages": ask(None, "Gone?")},
                       timeout=0.3)
        time.sleep(2.5)
        health = httpx.get(url + "/health").json()
        assert health["dropped"] == 2 and health["rows_decoded"] == 0, health
        assert health["compiles_after_warm_up"] == 0


def test_a_row_samples_the_same_in_any_batch(model):
    """Gumbel noise and random remasking: every row draws from its own key, so a request
    answers the same alone, second in a batch, or beside other prompts of other lengths."""
    from lladav_jax.serve.batcher import keys

    noisy = model.options(**OPTIONS, temperature=1.0, remasking="random")
    a, b = (model.prepare(png(i), q, noisy) for i, q in ((8, "Noise?"), (9, "A longer one?")))
    alone = model.decode([b], noisy, keys([5]))[0]
    batched = model.decode([a, b, a], noisy, keys([4, 5, 6, 6]), rows=4, prompt_len=256)[1]
    assert alone.text == batched.text and alone.ids == batched.ids
    assert model.generate(png(9), "A longer one?", seed=5, temperature=1.0,
                          remasking="random", **OPTIONS) == alone.text


def test_a_batch_waits_for_requests_still_arriving(model):
    """The gap closes a batch only when no request is being read: a request that joins 0.3 s
    after another (gap 20 ms) shares its batch while it was arriving all along, not otherwise."""
    from lladav_jax.serve.batcher import Job

    options = model.options(**OPTIONS)
    shapes = Shapes.for_model(model, options, 2, [1, 2], PROMPT)
    batches = []
    for hold in (True, False):
        batcher = Batcher(model, options, shapes, window_s=2.0, gap_s=0.02)
        batcher.start()
        done = []
        jobs = [Job(model.prepare(None, f"Q{i}?", options), options, 0,
                    lambda kind, _, done=done: done.append(kind)) for i in range(2)]
        with batcher.arriving() if hold else contextlib.nullcontext():
            batcher.submit(jobs[0])
            time.sleep(0.3)
            batcher.submit(jobs[1])
        while len(done) < 2:
            time.sleep(0.01)
        batcher.stop()
        batches.append(batcher.batches)
    assert batches == [1, 2]
