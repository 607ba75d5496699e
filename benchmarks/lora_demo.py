"""LoRA on the trained demo: held-out accuracy on a question the base never saw, and what the
adapters cost in optimizer state.

    lladav-train --config configs/demo.py --workdir /tmp/lladav-demo
    python benchmarks/lora_demo.py --base /tmp/lladav-demo --out /tmp/lora-bench [--quantize int4]

Trains configs/demo_lora.py from --base into OUT/lora (OUT/qlora-FORMAT with --quantize; a
finished run there is reused), then scores the base and the adapted model on the same held-out
samples (`heldout.masked_answer_accuracy`: every answer token masked, one forward pass) of the
new `size` question and of the demo's own four question types (what fine-tuning kept). The
optimizer state is the run's own (`abstract_opt_state` of its layout: the arrays the trainer
allocates), against a full fine-tune of the same model at the same settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib

import jax
from flax import nnx

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.scale import sharding
from lladav_jax.train import heldout, optim
from lladav_jax.train.loop import train
from lladav_jax.train.state import abstract_opt_state, model_layout

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo_lora.py"


def lora_config(base: str, quantize: str):
    spec = importlib.util.spec_from_file_location("demo_lora", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.init_from = base
    c.quantize.weights = quantize
    c.quantize.tile = 32  # int4: the tiny model's layers are 64-128 wide
    c.train.progress_bar = False
    return c


def opt_state_bytes(config) -> int:
    """Bytes of the optimizer state the trainer allocates for `config` (one device)."""
    mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:1])
    tx, _ = optim.make_optimizer(config.optim, 100)
    state = abstract_opt_state(tx, model_layout(config, mesh, tx))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def accuracy(directory: str, config, kind: str, quantize: str | None = None) -> dict:
    model, _ = modeldir.load_model(directory, quantize=quantize)
    c = config.copy_and_resolve_references()
    c.data.synthetic_kind = kind
    tokenizer = Tokenizer.load(str(modeldir.resolve(directory).tokenizer_dir))
    return heldout.masked_answer_accuracy(model, c, tokenizer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a trained demo workdir (configs/demo.py)")
    p.add_argument("--out", required=True, help="where the LoRA run goes")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                   help="QLoRA: the frozen base stored in this format")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    config = lora_config(args.base, args.quantize)
    workdir = pathlib.Path(args.out) / ("lora" if args.quantize == "none"
                                        else f"qlora-{args.quantize}")
    if not (workdir / "eval.json").exists():
        train(config, str(workdir))
    result = {"rank": config.lora.rank, "targets": config.lora.targets,
              "quantize": args.quantize, "steps": modeldir.latest_step_dir(workdir).name}
    for kind in ("size", "qa"):
        result[kind] = {name: accuracy(d, config, kind) for name, d in
                        (("base", args.base), ("lora", str(workdir)))}
    full = config.copy_and_resolve_references()
    full.lora.rank, full.quantize.weights = 0, "none"
    full.optim.lr = dict(vision=2e-3, connector=2e-3, llm=2e-3)
    result["opt_state_bytes"] = {"lora": opt_state_bytes(config), "full": opt_state_bytes(full)}
    result["opt_state_ratio"] = result["opt_state_bytes"]["lora"] / result["opt_state_bytes"][
        "full"]
    params = nnx.to_pure_dict(nnx.state(modeldir.load_model(str(workdir))[0], nnx.LoRAParam))
    result["adapter_params"] = sum(x.size for x in jax.tree.leaves(params))
    for kind in ("size", "qa"):
        r = result[kind]
        print(f"{kind}: base {r['base']['accuracy']:.3f} -> LoRA {r['lora']['accuracy']:.3f} "
              f"on {r['lora']['count']} held-out samples (chance {r['lora']['chance']:.3f})")
    b = result["opt_state_bytes"]
    print(f"optimizer state: LoRA {b['lora']:,} bytes, full fine-tune {b['full']:,} bytes "
          f"({100 * result['opt_state_ratio']:.2f}%); {result['adapter_params']:,} adapter "
          "parameters")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
