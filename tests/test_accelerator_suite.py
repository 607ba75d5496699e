"""benchmarks/accelerator.py, the suite a session lent a GPU runs at once: its smoke run on this
machine goes through every leg and writes the table's figures."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
def test_smoke_run(tmp_path):
    out = tmp_path / "acc.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--smoke", "--repeats", "1", "--out",
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    legs = res["sampler"]["legs"]
    shapes = res["shapes"]
    blocks = shapes["gen_length"] // shapes["block_length"]
    assert list(legs) == ["no cache", "dual", "dual + 0.9", "adaptive + 0.9"]
    assert legs["no cache"]["full_passes"] == legs["no cache"]["steps"] == shapes["steps"]
    assert legs["dual"]["full_passes"] == blocks and legs["dual"]["steps"] == shapes["steps"]
    assert 1 <= legs["adaptive + 0.9"]["full_passes"] <= legs["adaptive + 0.9"]["steps"]
    assert all(r["seconds"][0] > 0 and r["tokens_per_s"] > 0 for r in legs.values())
    train = res["train"]["legs"]
    assert list(train) == ["xla", "chunked"]  # the CPU has no fused attention: xla stands in
    for r in train.values():
        assert r["seconds"][0] > 0 and r["mfu"] is None and 0 < r["loss"] < 100
    assert "| adaptive + 0.9 |" in proc.stdout and "| chunked |" in proc.stdout
