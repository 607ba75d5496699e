"""lladav-serve: the model behind the OpenAI chat-completions API, requests decoded in batches.

  lladav-serve --ckpt DIR [--host 127.0.0.1] [--port 8000] [--name NAME]
    [--max_batch 32] [--batch_rows 1,4,16,32] [--prompt_lengths N,N] [--window_ms 50]
    [--gap_ms 5] [--queue_size 256] [--timeout_s 600]
    [sampler defaults: --gen_length N --steps N --block_length N --cache dual --threshold P ...]
    [--quantize none|int8|int4]

Then, from any OpenAI client (`base_url="http://127.0.0.1:8000/v1"`, any api_key):
POST /v1/chat/completions with text and image_url parts (data URLs or paths on the server),
`stream: true` for one event per decoded block, sampler options as extra body fields
(`max_tokens` is gen_length); GET /v1/models; GET /health.

Before it listens, the server compiles the sampler for every batch shape (rows x prompt length)
with its default options, so that no request waits for a compile; a request with other options
compiles its own program once (`compiles_after_warm_up` in /health counts them).
(also `python -m lladav_jax.cli.serve ...`)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from lladav_jax.cli import errors
from lladav_jax.cli.generate import (
    add_quantize_flags,
    add_sampler_flags,
    checked_sampler_options,
    load_options,
)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: integers >= 1")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lladav-serve", description=__doc__.split("\n\n")[0])
    add_sampler_flags(p)  # the defaults of requests that do not set them
    add_quantize_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model's name in the API (default: the --ckpt folder's)")
    p.add_argument("--max_batch", type=int, default=32, help="rows decoded together at most")
    p.add_argument("--batch_rows", type=_ints,
                   help="the batch sizes compiled at start (default 1,4,16,... and max_batch)")
    p.add_argument("--prompt_lengths", type=_ints,
                   help="the prompt lengths compiled at start (default: one that holds a "
                   "one-image prompt, and the longest the model takes)")
    p.add_argument("--window_ms", type=float, default=50.0,
                   help="how long a request waits at most for others to share its batch "
                   "(default 50)")
    p.add_argument("--gap_ms", type=float, default=5.0,
                   help="a batch starts once no request has joined it for this long "
                   "(default 5): a lone request waits only this")
    p.add_argument("--queue_size", type=int, default=256,
                   help="requests waiting at most; more are answered 429 (default 256)")
    p.add_argument("--timeout_s", type=float, default=600.0,
                   help="a request without an answer after this long is answered 504")
    p.add_argument("--image_cache_mb", type=float, default=1024.0,
                   help="device memory for the vision features of recent images, which the "
                   "later turns of a conversation reuse (default 1024)")
    errors.add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0 when stopped, 1 for an error the message names."""
    return errors.run("lladav-serve", lambda: _main(argv), argv)


def _main(argv: Sequence[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    errors.require_positive(p, args, ("max_batch", "queue_size", "timeout_s", "image_cache_mb"))
    if args.batch_rows and max(args.batch_rows) != args.max_batch:
        p.error(f"--batch_rows {args.batch_rows}: the largest must be --max_batch "
                f"{args.max_batch}")
    defaults = checked_sampler_options(p, args)
    quantize = load_options(p, args)
    try:
        import uvicorn  # noqa: F401  (the serve extra)
    except ImportError:
        raise ValueError('lladav-serve needs FastAPI and uvicorn: pip install -e ".[serve]"'
                         ) from None
    from lladav_jax.inference import api  # jax is imported only once the flags are good
    from lladav_jax.serve.batcher import Batcher, Shapes
    from lladav_jax.serve.server import serve

    log = logging.getLogger("lladav.serve")  # its own handler: JAX's imports set up the root's
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s lladav-serve: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    model = api.load(args.ckpt, **quantize)
    model.feature_cache_bytes = int(args.image_cache_mb * 2**20)
    if args.system is not None:
        model.system_prompt = args.system
    options = model.options(**defaults)
    shapes = Shapes.for_model(model, options, args.max_batch, args.batch_rows,
                              args.prompt_lengths)
    batcher = Batcher(model, options, shapes, window_s=args.window_ms / 1000,
                      gap_s=args.gap_ms / 1000, queue_size=args.queue_size)
    name = args.name or os.path.basename(os.path.normpath(args.ckpt))
    serve(model, batcher, name, args.host, args.port, timeout_s=args.timeout_s,
          defaults=defaults, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
