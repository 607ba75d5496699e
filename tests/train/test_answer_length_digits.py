"""The digits demo (configs/demo_digits.py) trained from scratch with EOS padding, on a shorter
run, answers through the real sampler at every window: its end-of-training report, and
`lladav-eval` at its defaults agreeing with it (docs/design.md §4.5)."""

import json

import pytest

from lladav_jax.cli import eval as eval_cli
from lladav_jax.data.digits import write_digits
from tests.data.test_digits import CONFIG
from tests.train.test_answer_length import _train_and_report

CHANCE = 0.1  # ten digits
EPOCHS = 10  # a quarter of the demo's 40: 938 steps


@pytest.mark.slow
def test_short_digits_run_answers_at_every_window(tmp_path, capsys):
    data = tmp_path / "digits"
    write_digits(data)
    work = tmp_path / "run"
    windows = _train_and_report(CONFIG, work, 297, f"--config.data.path={data / 'train.json'}",
                                f"--config.data.eval_path={data / 'test.json'}",
                                f"--config.data.num_epochs={EPOCHS}")
    for window, result in windows.items():
        assert result["accuracy"] > 2 * CHANCE, (window, result)
    # lladav-eval with its defaults (128 tokens, the model's allow_eos) agrees with the report.
    out = tmp_path / "answers.jsonl"
    assert eval_cli.main(["--ckpt", str(work), "--data", str(data / "test.jsonl"),
                          "--out", str(out), "--batch_size", "64"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    assert f"accuracy: {accuracy:.4f}" in capsys.readouterr().out
    assert accuracy == pytest.approx(windows["128"]["accuracy"], abs=0.02)
