"""lladav-serve under load: N concurrent `openai` clients against the same N requests sent one
by one, on a trained demo model; every answer checked against `generate` alone.

    lladav-train --config configs/demo.py --workdir /tmp/lladav-demo
    python benchmarks/serve.py --ckpt /tmp/lladav-demo --clients 32 --repeats 3

The server runs in this process (`serve.server.running`, warmed up before the clock), the
clients in threads of another; the requests are held-out synthetic questions (the `test`
split), each with its own image. Legs alternate (one by one, concurrent, one by one, ...) so
that load on a shared machine falls on both; each is timed whole. Also printed: XLA compiles
after the warm-up (must be 0) and the batches the server ran.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import json
import multiprocessing
import statistics
import time

import httpx
import openai

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.synthetic import SyntheticSource
from lladav_jax.inference import api
from lladav_jax.serve.batcher import Batcher, Shapes
from lladav_jax.serve.server import running


def messages(row: dict) -> list[dict]:
    question = row["conversations"][0]["value"].replace("<image>\n", "")
    url = "data:image/png;base64," + base64.b64encode(row["images"][0]).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def leg(url: str, rows: list[dict], clients: int, kind: str) -> tuple[float, list[str]]:
    """One leg, timed whole, in the client process: the rows sent by `clients` threads (1: one
    after another), through the `openai` client or plain HTTP posts of ready JSON (`httpx`:
    less client work on the server's cores)."""
    if kind == "openai":
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                               timeout=3600)

        def ask(row: dict) -> str:
            reply = client.chat.completions.create(model="demo", messages=messages(row))
            return reply.choices[0].message.content
    else:
        http = httpx.Client(base_url=url, timeout=3600,
                            limits=httpx.Limits(max_connections=clients))
        bodies = {id(r): json.dumps({"messages": messages(r)}).encode() for r in rows}

        def ask(row: dict) -> str:
            reply = http.post("/v1/chat/completions", content=bodies[id(row)],
                              headers={"content-type": "application/json"})
            return reply.json()["choices"][0]["message"]["content"]

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(ask, rows))
    return time.perf_counter() - start, answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a trained demo workdir or model directory")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="pairs of legs")
    p.add_argument("--window_ms", type=float, default=50.0)
    p.add_argument("--gap_ms", type=float, default=5.0)
    p.add_argument("--batch_rows", help="compiled batch sizes, e.g. 1,4,16,32 (the default)")
    p.add_argument("--prompt_lengths", help="compiled prompt lengths (default: the server's)")
    p.add_argument("--options", default="{}",
                   help='sampler options of every request, JSON (default: the model\'s)')
    p.add_argument("--client", choices=("httpx", "openai"), default="openai",
                   help="the clients: the openai client, or plain posts of ready JSON")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    model = api.load(args.ckpt)
    options = model.options(**json.loads(args.options))
    run = modeldir.run_config(modeldir.resolve(args.ckpt).tokenizer_dir)
    source = SyntheticSource(args.clients, split="test", seed=run.get("data", {}).get("seed", 0))
    rows = [source[i] for i in range(args.clients)]
    ints = lambda text: [int(v) for v in text.split(",")] if text else None
    shapes = Shapes.for_model(model, options, args.clients, ints(args.batch_rows),
                              ints(args.prompt_lengths))
    batcher = Batcher(model, options, shapes, window_s=args.window_ms / 1000,
                      gap_s=args.gap_ms / 1000, queue_size=2 * args.clients)
    t0 = time.perf_counter()
    # The clients live in a process of their own: the server's Python threads do not share
    # its interpreter lock with them.
    clients = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with running(model, batcher, defaults=json.loads(args.options)) as url, clients:
        warm = time.perf_counter() - t0
        seconds = {"one by one": [], "concurrent": []}
        answers = {}
        for _ in range(args.repeats):
            for name, n in (("one by one", 1), ("concurrent", args.clients)):
                s, got = clients.submit(leg, url, rows, n, args.client).result()
                seconds[name].append(s)
                answers.setdefault(name, got)
        health = httpx.get(url + "/health").json()
    alone = [model.generate(r["images"][0], messages(r)[0]["content"][1]["text"],
                            **json.loads(args.options)) for r in rows]
    same = {name: a == alone for name, a in answers.items()}
    right = sum(a == r["answer"] for a, r in zip(answers["concurrent"], rows, strict=True))
    ratios = [a / b for a, b in zip(seconds["one by one"], seconds["concurrent"], strict=True)]
    print(f"{args.clients} requests ({args.client} clients), options {options}; warm-up "
          f"{warm:.1f} s "
          f"({len(shapes.rows)} x {len(shapes.prompt_lengths)} shapes)")
    for name, s in seconds.items():
        print(f"{name:>11}: " + ", ".join(f"{x:.2f}" for x in s) + " s")
    print(f"concurrent / one by one: {statistics.median(ratios):.2f}x faster (median; "
          f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} pairs)")
    print(f"answers equal to generate() alone: {same}; exact match {right}/{len(rows)}; "
          f"compiles after warm-up {health['compiles_after_warm_up']}; batches "
          f"{health['batches']} for {health['rows_decoded']} rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": seconds, "ratios": ratios, "same": same, "health": health,
                       "warm_up_s": warm}, f, indent=2)


if __name__ == "__main__":
    main()
