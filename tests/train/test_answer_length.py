"""A model trained from scratch with EOS padding answers through the real sampler at every
window: the real-data demo (configs/demo_digits.py) on a shorter run, its end-of-training report
and `lladav-eval` at the default settings (docs/design.md §4.5)."""

import json
import os
import subprocess
import sys

import pytest

from lladav_jax.cli import eval as eval_cli
from lladav_jax.data.digits import write_digits
from tests.data.test_digits import CONFIG

CHANCE = 0.1  # ten digits
EPOCHS = 20  # half the demo (40): 1,875 steps


@pytest.mark.slow
def test_short_digits_run_answers_at_every_window(tmp_path, capsys):
    data = tmp_path / "digits"
    write_digits(data)
    work = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "lladav_jax.cli.train", "--config", str(CONFIG),
                    "--workdir", str(work), f"--config.data.path={data / 'train.json'}",
                    f"--config.data.eval_path={data / 'test.json'}",
                    f"--config.data.num_epochs={EPOCHS}", "--config.train.progress_bar=false"],
                   check=True, env=env, timeout=900)
    report = json.loads((work / "eval.json").read_text())
    assert report["count"] == 297
    windows = report["generation"]
    assert sorted(windows, key=int) == ["4", "16", "128"]
    for window, result in windows.items():
        assert result["count"] == 297
        assert result["accuracy"] > 2 * CHANCE, (window, result)
    # lladav-eval with its defaults (128 tokens, the model's allow_eos) agrees with the report.
    out = tmp_path / "answers.jsonl"
    assert eval_cli.main(["--ckpt", str(work), "--data", str(data / "test.jsonl"),
                          "--out", str(out), "--batch_size", "64"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    assert f"accuracy: {accuracy:.4f}" in capsys.readouterr().out
    assert accuracy == pytest.approx(windows["128"]["accuracy"], abs=0.02)
