"""`lladav-serve` as users start it: a subprocess on 127.0.0.1 answers the `openai` client as
`lladav-generate` answers the same question; bad flags fail with one line before any model
loads; SIGTERM stops it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from lladav_jax.cli import serve
from tests.serve.test_server import png
from tests.tiny_model import random_model_dir
from tests.train.test_train import free_port

SAMPLER = ["--gen_length", "16", "--steps", "8", "--block_length", "8"]


@pytest.mark.parametrize(("argv", "words"), [
    (["--max_batch", "8", "--batch_rows", "1,4"], ["--batch_rows", "largest", "8"]),
    (["--batch_rows", "1,x"], ["--batch_rows", "integers"]),
    (["--max_batch", "0"], ["--max_batch"]),
    (["--steps", "7", "--gen_length", "16", "--block_length", "8"], ["--steps=7"]),
])
def test_bad_flags_fail_before_loading(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--ckpt", str(tmp_path / "none"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("lladav-serve: error: "), err
    assert all(w in lines[0] for w in words), err


@pytest.mark.slow
def test_serves_the_answer_lladav_generate_gives(tmp_path):
    model = random_model_dir(tmp_path)
    image = tmp_path / "a.png"
    image.write_bytes(png(5))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lladav_jax.cli.serve", "--ckpt", str(model), "--port",
         str(port), "--max_batch", "2", "--batch_rows", "1,2", "--prompt_lengths", "256",
         *SAMPLER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # the warm-up compiles first
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["model"]
        reply = client.chat.completions.create(model="model", messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}},
                                        {"type": "text", "text": "What shape?"}]}])
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions
                           .create(model="model", stream=True, messages=[{
                               "role": "user", "content": "Hello?"}]))
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    # uvicorn shuts down, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM) and "shutdown complete" in out, out
    assert "warm-up: 2 batch shapes compiled" in out
    generate = [sys.executable, "-m", "lladav_jax.cli.generate", "--ckpt", str(model), *SAMPLER]
    want = subprocess.run([*generate, "--image", str(image), "--prompt", "What shape?"],
                          capture_output=True, text=True, check=True).stdout
    assert reply.choices[0].message.content == want.rstrip("\n")
    want = subprocess.run([*generate, "--prompt", "Hello?"], capture_output=True, text=True,
                          check=True).stdout
    assert streamed == want.rstrip("\n")
