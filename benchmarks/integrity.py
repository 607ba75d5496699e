"""What checkpoint integrity costs: checksums and finiteness of a train state, against the
save and the restore they guard.

    python benchmarks/integrity.py [--variant small] [--repeats 5] [--tmp /tmp]

Builds the parameters of a model variant (random) and an Adam-like optimizer state (two more
copies), then, `--repeats` times with the legs interleaved: `integrity.summarize` of the whole
state, a synchronous Orbax save of it (what `Checkpoints.save` writes, without the data
iterator), and a restore of it. Prints the median and spread of each leg and the ratios of the
checksum leg to the save and to the restore. Removes what it wrote.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lladav_jax.models import lladav, variants
from lladav_jax.train import integrity


def state_of(variant: str) -> dict:
    """params plus two optimizer moments shaped like them (float32)."""
    model = lladav.create(variants.model_config(variant), seed=0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    moments = jax.tree.map(lambda x: x * 0.5, params)
    return {"params": params, "opt_state": {"mu": moments, "nu": jax.tree.map(abs, moments)}}


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="small")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()

    state = state_of(args.variant)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    root = pathlib.Path(tempfile.mkdtemp(dir=args.tmp))
    checkpointer = ocp.StandardCheckpointer()

    def save(path: pathlib.Path) -> None:
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()

    def restore(path: pathlib.Path) -> None:
        jax.block_until_ready(checkpointer.restore(path, target))

    integrity.summarize(state)  # compiled once, as a run does at its first save
    legs: dict[str, list[float]] = {"checksums": [], "save": [], "restore": []}
    try:
        for r in range(args.repeats):
            path = root / f"r{r}"
            legs["checksums"].append(timed(integrity.summarize, state))
            legs["save"].append(timed(save, path))
            legs["restore"].append(timed(restore, path))
            shutil.rmtree(path)
    finally:
        checkpointer.close()
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.variant}: state {nbytes / 2**20:.0f} MiB (params + 2 moments, float32), "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), {args.repeats} "
          "interleaved repeats")
    for name, times in legs.items():
        print(f"  {name:9s} median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f})")
    for other in ("save", "restore"):
        ratios = [c / o for c, o in zip(legs["checksums"], legs[other], strict=True)]
        print(f"  checksums / {other}: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"  checksum throughput {nbytes / statistics.median(legs['checksums']) / 1e9:.2f} "
          "GB/s")


if __name__ == "__main__":
    main()
