"""lladav-generate: answer one question about images or a video (docs/design.md §10.3).

  lladav-generate --ckpt DIR [--image PATH [--image PATH ...] | --video PATH [--uniform_frames]]
    --prompt TEXT [--gen_length N]
    [--steps N] [--block_length N] [--temperature T] [--remasking low_confidence|random]
    [--cfg_scale S] [--cache none|prefix|dual|adaptive] [--threshold P]
    [--refresh_threshold D] [--seed S] [--output_ids]
    [--stream] [--order_png PATH] [--quantize none|int8|int4] [--quantize_tile N]
    [--quantize_vision]

One image is laid out AnyRes; several images (in the order given) get one padded tile each; a
video's frames are chosen about one a second (at most video.max_frames), or with
--uniform_frames video.max_frames frames spread evenly, as the benchmark evaluation reads them.

Prints the answer. With --output_ids it prints one JSON line instead: the answer, its token ids,
every generated id and the steps run. --stream prints each block's text as it is decoded;
--order_png draws the order in which the answer's tokens were committed. --quantize loads the
weights as int8 or int4 (weight-only; `lladav_jax.inference.api.load`).
(also `python -m lladav_jax.cli.generate ...`)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lladav_jax.cli import errors
from lladav_jax.diffusion.options import CACHES, REMASKING, SamplerOptions

DEFAULTS = SamplerOptions.defaults()  # every sampler option, by name
# Options whose default the loaded model decides (`api.sampler_defaults`): left out unless set.
MODEL_DEFAULTS = ("allow_eos",)
# `lladav_jax.models.config.WEIGHT_FORMATS`, spelt out: importing it would import JAX before the
# flags are checked (a test keeps the two the same).
QUANTIZE_FORMATS = ("none", "int8", "int4")


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """--ckpt and the sampler options; unset options are None (the caller picks defaults)."""
    d = DEFAULTS
    p.add_argument("--ckpt", required=True,
                   help="a model directory, a training workdir (latest step) or a step directory")
    p.add_argument("--gen_length", type=int,
                   help=f"answer length in tokens (default {d['gen_length']})")
    p.add_argument("--steps", type=int, help=f"denoising steps in all (default {d['steps']})")
    p.add_argument("--block_length", type=int,
                   help=f"tokens per block (default {d['block_length']})")
    p.add_argument("--temperature", type=float,
                   help=f"Gumbel noise temperature (default {d['temperature']:g})")
    p.add_argument("--remasking", choices=REMASKING, help=f"default {d['remasking']}")
    p.add_argument("--cfg_scale", type=float,
                   help=f"classifier-free guidance, 0: off (default {d['cfg_scale']:g})")
    p.add_argument("--cache", choices=CACHES, help=f"KV cache (default {d['cache']})")
    p.add_argument("--threshold", type=float,
                   help="parallel decoding: commit every token above this confidence")
    p.add_argument("--refresh_threshold", type=float,
                   help="--cache adaptive: refresh the cache when its drift reaches this "
                   f"(default {d['refresh_threshold']:g})")
    p.add_argument("--shrink_batch", action=argparse.BooleanOptionalAction,
                   help="between blocks, finished rows leave the batch (a block program "
                   "compiled per halved batch size) (default off)")
    p.add_argument("--allow_eos", action=argparse.BooleanOptionalAction,
                   help="let EOS fill the answer window and end the answer (default: on for a "
                   "model trained with data.answer_window > 0, else off, the official rule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", help="system prompt (default: the one the model was trained "
                   "with, read from a training workdir, else the official one)")


def add_quantize_flags(p: argparse.ArgumentParser) -> None:
    """--quantize, --quantize_tile and --quantize_vision: weight-only quantization at load."""
    p.add_argument("--quantize", choices=QUANTIZE_FORMATS, default="none",
                   help="quantize the weights as they load: the language model's linear layers, "
                   "head and embedding table; int8 (one scale per output channel) or int4 (one "
                   "per --quantize_tile inputs). Activations and caches keep the compute dtype "
                   "(default none)")
    p.add_argument("--quantize_tile", type=int, default=128,
                   help="int4: inputs per scale; must divide every quantized layer's input width "
                   "(a narrower layer uses its whole width) (default 128)")
    p.add_argument("--quantize_vision", action="store_true",
                   help="quantize the vision tower's linear layers too (default: kept)")


def load_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The keyword arguments of `api.load` from the --quantize flags, checked before the model
    loads (a usage error, exit 2); whether the tile fits the model is checked by `api.load`,
    once its config is read (exit 1)."""
    errors.require_positive(parser, args, ("quantize_tile",))
    if args.quantize_vision and args.quantize == "none":
        parser.error("--quantize_vision: needs --quantize int8 or int4")
    if args.quantize == "none":
        return {}
    return {"quantize": args.quantize, "quantize_tile": args.quantize_tile,
            "quantize_vision": args.quantize_vision}


def sampler_options(args: argparse.Namespace, base: dict | None = None) -> dict:
    """Options for Model.generate: flags given, else `base` (a preset), else the sampler's
    defaults (DEFAULTS), but for MODEL_DEFAULTS, which the model decides when unset."""
    out = {k: v for k, v in DEFAULTS.items() if k not in MODEL_DEFAULTS}
    out.update(base or {})
    out.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    return out


def checked_sampler_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                            base: dict | None = None) -> dict:
    """`sampler_options`, checked by SamplerOptions (the one definition of the ranges) before
    the model loads; one out of range is a usage error naming the flag (exit 2)."""
    options = sampler_options(args, base)
    try:
        SamplerOptions(**options)
    except ValueError as e:
        parser.error(str(e).replace("sampler option ", "--", 1))
    return options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lladav-generate", description=__doc__.split("\n\n")[0])
    add_sampler_flags(p)
    add_quantize_flags(p)
    visual = p.add_mutually_exclusive_group()
    visual.add_argument("--image", action="append", default=[],
                        help="an image file; repeat for several, kept in order (one image is "
                             "laid out AnyRes, several images each get one padded tile)")
    visual.add_argument("--video", help="a video file, instead of images")
    p.add_argument("--uniform_frames", action="store_true",
                   help="with --video: video.max_frames frames spread evenly from the first to "
                        "the last (as benchmark evaluation reads videos; default: about one "
                        "frame a second, at most video.max_frames)")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--output_ids", action="store_true",
                   help="print one JSON line with the answer and the generated token ids")
    p.add_argument("--stream", action="store_true", help="print each block as it is decoded")
    p.add_argument("--order_png", help="save a picture of the denoising order here")
    errors.add_debug_flag(p)
    return p


class _Streamer:
    """Prints the new part of the answer after each block."""

    def __init__(self, out):
        self.out, self.shown = out, ""

    def __call__(self, block) -> None:
        from lladav_jax.inference.api import text_delta  # imported with jax, after the flags

        delta = text_delta(self.shown, block.text)
        if delta:
            self.out.write(delta)
            self.out.flush()
            self.shown += delta


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0, 1 for an error the message names (`errors.run`)."""
    return errors.run("lladav-generate", lambda: _main(argv), argv)


def _main(argv: Sequence[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.uniform_frames and args.video is None:
        p.error("--uniform_frames needs --video")
    options = checked_sampler_options(p, args)
    quantize = load_options(p, args)
    from lladav_jax.inference import api  # jax is imported only once the flags are good

    model = api.load(args.ckpt, **quantize)
    streamer = _Streamer(sys.stdout) if args.stream else None
    visual = args.image if args.video is None else api.Video(args.video,
                                                               uniform=args.uniform_frames)
    result = model.generate(visual, args.prompt, seed=args.seed, on_block=streamer,
                            return_details=True, system=args.system, **options)
    if streamer is not None:
        print()
    if args.output_ids:
        print(json.dumps({"answer": result.text, "ids": result.ids,
                          "tokens": result.tokens.tolist(), "steps": result.steps}))
    elif streamer is None:
        print(result.text)
    if args.order_png:
        from lladav_jax.inference.visualize import denoising_order_png

        denoising_order_png(result.tokens, result.committed_at, model.tokenizer, args.order_png)
        print(f"denoising order: {args.order_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
