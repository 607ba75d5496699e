"""lladav-convert: the official Hugging Face / PyTorch layout <-> our model directories.

    lladav-convert import-hf --hf_dir D --out DIR [--param_dtype float32|bfloat16]
    lladav-convert import-hf --llm DIR --vision DIR --out DIR [--seed N]   # stage-1 start
    lladav-convert export-hf --ckpt DIR --out D [--dtype bfloat16|float32] [--shard_bytes N]
    lladav-convert export-hf --ckpt LORA_DIR --out D --adapter_only       # a PEFT adapter
    lladav-convert import-hf --adapter D --base DIR --out LORA_DIR        # adapter + its base

A LoRA/QLoRA model exports merged; --adapter_only writes its adapters alone as a PEFT adapter
directory, which import-hf --adapter adds back to a plain base (`checkpoints.peft_adapter`).
A tensor holding NaN or inf is refused by name; --allow_nonfinite converts it anyway.

How it streams and checks: `lladav_jax.checkpoints.hf_convert`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lladav_jax.checkpoints.hf_convert import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_SHARD_BYTES,
    FLOAT_DTYPES,
    export_hf,
    import_hf,
    import_parts,
)
from lladav_jax.checkpoints.peft_adapter import export_adapter, import_adapter
from lladav_jax.cli import errors


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lladav-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="official HF layout -> our model directory")
    imp.add_argument("--hf_dir", help="an official LLaDA-V directory")
    imp.add_argument("--llm", help="LLaDA-8B(-Instruct) directory (with --vision)")
    imp.add_argument("--vision", help="SigLIP/SigLIP2 HF directory (with --llm)")
    imp.add_argument("--adapter", help="a PEFT LoRA adapter directory (with --base)")
    imp.add_argument("--base", help="the plain model directory the adapter adapts (with "
                     "--adapter); the output is it with the adapters")
    imp.add_argument("--out", required=True, help="model directory to create")
    imp.add_argument("--param_dtype", default="float32", choices=FLOAT_DTYPES)
    imp.add_argument("--seed", type=int, default=0, help="connector init (with --llm)")
    exp = sub.add_parser("export-hf", help="our model directory -> official HF layout")
    exp.add_argument("--ckpt", required=True, help="model directory")
    exp.add_argument("--out", required=True, help="HF directory to create")
    exp.add_argument("--dtype", choices=FLOAT_DTYPES,
                     help="default bfloat16; float32 with --adapter_only (adapters train in it)")
    exp.add_argument("--shard_bytes", type=int, default=DEFAULT_SHARD_BYTES)
    exp.add_argument("--adapter_only", action="store_true",
                     help="a LoRA model's adapters alone, as a PEFT adapter directory "
                          "(adapter_config.json, adapter_model.safetensors) for the base it "
                          "was trained from; without it a LoRA/QLoRA model exports merged")
    for q in (imp, exp):
        q.add_argument("--block_bytes", type=int, default=DEFAULT_BLOCK_BYTES,
                       help="bytes moved at a time (bounds peak memory)")
        q.add_argument("--allow_nonfinite", action="store_true",
                       help="convert tensors holding NaN or inf (refused by default)")
    errors.add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0, 1 for an error the message names (`errors.run`)."""
    return errors.run("lladav-convert", lambda: _main(argv), argv)


def _main(argv: Sequence[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    errors.require_positive(p, args, ("shard_bytes", "block_bytes"))
    # WeightMappingError, SafetensorsError, ModelDirError, ConversionError are ValueErrors:
    # errors.run prints them as one `lladav-convert: error:` line (exit 1).
    if args.command == "export-hf" and args.adapter_only:
        export_adapter(args.ckpt, args.out, dtype=args.dtype or "float32",
                       allow_nonfinite=args.allow_nonfinite)
    elif args.command == "export-hf":
        export_hf(args.ckpt, args.out, dtype=args.dtype or "bfloat16", shard_bytes=args.shard_bytes,
                  block_bytes=args.block_bytes, allow_nonfinite=args.allow_nonfinite)
    elif args.adapter or args.base:
        if not (args.adapter and args.base) or args.hf_dir or args.llm or args.vision:
            p.error("import-hf --adapter takes --base (and neither --hf_dir, --llm nor --vision)")
        import_adapter(args.adapter, args.base, args.out, block_bytes=args.block_bytes,
                       allow_nonfinite=args.allow_nonfinite)
    elif args.hf_dir and not (args.llm or args.vision):
        import_hf(args.hf_dir, args.out, param_dtype=args.param_dtype,
                  block_bytes=args.block_bytes, allow_nonfinite=args.allow_nonfinite)
    elif args.llm and args.vision and not args.hf_dir:
        import_parts(args.llm, args.vision, args.out, seed=args.seed,
                     param_dtype=args.param_dtype, block_bytes=args.block_bytes,
                     allow_nonfinite=args.allow_nonfinite)
    else:
        p.error("import-hf takes --hf_dir, or --llm and --vision, or --adapter and --base")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
