"""Peak memory of checkpoint conversion, as a fraction of the checkpoint size.

    python benchmarks/convert.py [--gb 2.1] [--block_bytes N] [--tmp /tmp]

Writes a synthetic official-layout LLaDA-V checkpoint (bf16, at least 2 GB; written one row
block at a time), then runs, each in its own subprocess: `import-hf` (to float32 params, the
larger side) and `export-hf` (back to bf16). Peak resident memory comes from `os.wait4` of
each child; the bare imports (python + jax + orbax) are measured the same way as a baseline.
Finally checks that the round trip is bit-identical, and removes everything it wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import ml_dtypes
import numpy as np

from lladav_jax.checkpoints import hf_convert, safetensors_io
from lladav_jax.models import hf_config, hf_params, lladav, variants

REPO = pathlib.Path(__file__).resolve().parents[1]


def bench_config(gb: float):
    """The `small` vision tower and a LLaDA-shaped LM (hidden 2048, MLP 5632) with as many
    layers as it takes to reach `gb` GB in bf16."""
    cfg = variants.model_config("small")
    cfg.text.update(vocab_size=64000, hidden_size=2048, num_heads=16, num_kv_heads=16,
                    head_dim=128, intermediate_size=5632)
    cfg.text.num_layers = 1
    one = lladav.param_counts(cfg)["total"]
    cfg.text.num_layers = 2
    per_layer = lladav.param_counts(cfg)["total"] - one
    cfg.text.num_layers = max(1, math.ceil((gb * 1e9 / 2 - (one - per_layer)) / per_layer))
    return cfg


def write_synthetic(path: pathlib.Path, cfg) -> int:
    """A random bf16 official-layout directory, generated and written a row block at a time."""
    entries = hf_params.lladav_entries(cfg)
    shapes = hf_params.expected_hf_shapes(entries, lladav.abstract_params(cfg))
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def blocks(key: str, shape: tuple[int, ...]):
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        for a, b in hf_params.row_ranges(shape, 4, 32 << 20):
            yield rng.standard_normal((b - a, *shape[1:]), np.float32).astype(bf16)

    tensors = [safetensors_io.PendingTensor(k, s, bf16, lambda k=k, s=s: blocks(k, s))
               for k, s in shapes.items()]
    path.mkdir()
    index = safetensors_io.write_sharded(path, tensors, 5 * 10**9 // 4)  # a few shards
    (path / "config.json").write_text(json.dumps(hf_config.config_to_hf(cfg, "bfloat16")))
    return index["metadata"]["total_size"]


def measure(code: str) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of `python -c code` in a fresh child process."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"child failed ({child.returncode}): {code}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def same_tensors(a: pathlib.Path, b: pathlib.Path) -> bool:
    ta, tb = safetensors_io.open_checkpoint(a), safetensors_io.open_checkpoint(b)
    extra = {k for k in tb if "post_layernorm" in k}  # written by the exporter (identity)
    if set(tb) - extra != set(ta):
        return False
    for k, t in ta.items():
        for start, stop in hf_params.row_ranges(t.shape, 2, 64 << 20):
            x, y = t[start:stop], tb[k][start:stop]
            if not np.array_equal(x.view(np.uint16), y.view(np.uint16)):
                return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.1, help="checkpoint size to build (bf16)")
    p.add_argument("--block_bytes", type=int, default=hf_convert.DEFAULT_BLOCK_BYTES)
    p.add_argument("--tmp", default="/tmp")
    args = p.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="lladav-convert-bench-", dir=args.tmp))
    try:
        cfg = bench_config(args.gb)
        hf, ours, back = work / "hf", work / "ours", work / "back"
        size = write_synthetic(hf, cfg)
        fp32 = size * 2
        base, _ = measure("import lladav_jax.checkpoints.hf_convert")
        load = "from lladav_jax.checkpoints import hf_convert; hf_convert"
        imp, t_imp = measure(f"{load}.import_hf({str(hf)!r}, {str(ours)!r}, "
                             f"block_bytes={args.block_bytes})")
        exp, t_exp = measure(f"{load}.export_hf({str(ours)!r}, {str(back)!r}, "
                             f"block_bytes={args.block_bytes})")
        exact = same_tensors(hf, back)
        t = cfg.text
        rows = [
            ("import-hf (bf16 -> float32 params)", imp, t_imp),
            ("export-hf (float32 params -> bf16)", exp, t_exp),
        ]
        print(f"model: text hidden {t.hidden_size}, {t.num_layers} layers, MLP "
              f"{t.intermediate_size}, vocab {t.vocab_size}; vision `small`")
        print(f"checkpoint: {size / 1e9:.2f} GB bf16 safetensors ({fp32 / 1e9:.2f} GB as float32;"
              f" Orbax dir on disk {dir_bytes(ours) / 1e9:.2f} GB); block_bytes "
              f"{args.block_bytes >> 20} MiB")
        print(f"baseline (python + jax + orbax imports): peak RSS {base / 1e6:.0f} MB")
        print("| conversion | peak RSS | / checkpoint (bf16) | / float32 model | "
              "above baseline / checkpoint | wall |")
        print("|---|---|---|---|---|---|")
        for name, rss, sec in rows:
            print(f"| {name} | {rss / 1e6:.0f} MB | {rss / size:.3f} | {rss / fp32:.3f} | "
                  f"{(rss - base) / size:.3f} | {sec:.0f} s |")
        print(f"round trip bit-identical: {exact}")
        if not exact:
            raise SystemExit("round trip is not bit-identical")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
