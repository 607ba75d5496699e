"""Every command fails on a bad invocation with one `PROG: error:` line naming the setting and
no traceback: exit 2 for a command line that does not parse or a flag out of its range, 1 for a
failure at work (a missing model directory, a bad config at training time)."""

import os
import pathlib
import subprocess
import sys

import pytest

from lladav_jax.cli import convert, data, errors, generate
from lladav_jax.cli import eval as eval_cli
from lladav_jax.cli import train as train_cli
from lladav_jax.train.config_check import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)


def _one_error_line(err: str, prog: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert all(w in lines[0] for w in words), err
    assert "Traceback" not in err


def _exit_status(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse usage errors, and the absl commands always exit
        return e.code


@pytest.mark.parametrize(("argv", "words"), [
    (["--gen_length", "0"], ["--gen_length=0", ">= 1"]),
    (["--gen_length", "-1"], ["--gen_length=-1", ">= 1"]),
    (["--temperature", "-1"], ["--temperature=-1.0", ">= 0"]),
    (["--gen_length", "64", "--block_length", "48"], ["multiple of block_length 48"]),
    (["--threshold", "0"], ["--threshold=0.0", "(0, 1]"]),
])
def test_generate_checks_the_sampler_flags_before_loading(argv, words, tmp_path, capsys):
    # --ckpt does not exist: the flags are refused before any model is looked for.
    status = _exit_status(generate.main, ["--ckpt", str(tmp_path / "none"), "--prompt", "q",
                                          *argv])
    assert status == 2
    _one_error_line(capsys.readouterr().err, "lladav-generate", *words)


def test_generate_without_a_model_directory(tmp_path, capsys):
    assert generate.main(["--ckpt", str(tmp_path / "none"), "--prompt", "q"]) == 1
    _one_error_line(capsys.readouterr().err, "lladav-generate", "none")


def test_eval(tmp_path, capsys):
    argv = ["--ckpt", str(tmp_path), "--data", str(tmp_path / "q.jsonl"), "--out",
            str(tmp_path / "o.jsonl")]
    assert _exit_status(eval_cli.main, [*argv, "--batch_size", "0"]) == 2
    _one_error_line(capsys.readouterr().err, "lladav-eval", "--batch_size=0", ">= 1")
    assert _exit_status(eval_cli.main, [*argv, "--steps", "0"]) == 2
    _one_error_line(capsys.readouterr().err, "lladav-eval", "--steps=0")
    assert eval_cli.main(argv) == 1  # no such data file
    _one_error_line(capsys.readouterr().err, "lladav-eval", "q.jsonl")


def test_convert(tmp_path, capsys):
    argv = ["export-hf", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "hf")]
    assert _exit_status(convert.main, [*argv, "--shard_bytes", "0"]) == 2
    _one_error_line(capsys.readouterr().err, "lladav-convert", "--shard_bytes=0", ">= 1")
    assert _exit_status(convert.main, [*argv, "--block_bytes", "-5"]) == 2
    _one_error_line(capsys.readouterr().err, "lladav-convert", "--block_bytes=-5")
    assert convert.main(argv) == 1
    _one_error_line(capsys.readouterr().err, "lladav-convert", "none")


def test_data(tmp_path, capsys):
    argv = ["pack-arrayrecord", "--data_path", str(tmp_path / "none.json"), "--out",
            str(tmp_path / "shards")]
    assert _exit_status(data.main, [*argv, "--num_shards", "0"]) == 2
    _one_error_line(capsys.readouterr().err, "lladav-data", "--num_shards=0", ">= 1")
    assert _exit_status(data.main, [*argv, "--num_threads", "0"]) == 2
    _one_error_line(capsys.readouterr().err, "lladav-data", "--num_threads=0", ">= 1")
    assert data.main(argv) == 1
    _one_error_line(capsys.readouterr().err, "lladav-data", "none.json")


TRAIN = ["lladav-train", "--config", str(REPO / "configs/demo.py")]


@pytest.mark.parametrize(("argv", "words"), [
    ([*TRAIN, "--workdir", "w", "--config.train.stepz=5"],
     ["unknown config key train.stepz; did you mean train.steps?"]),
    ([*TRAIN, "--workdir", "w", "--config.train.steps=abc"],
     ["--config.train.steps=abc", "invalid literal for int()"]),
    ([*TRAIN], ["--workdir is required"]),
    (["lladav-train", "--config", "nope.py", "--workdir", "w"],
     ["--config nope.py does not load", "No such file"]),
])
def test_train_command_line(argv, words, capsys):
    assert _exit_status(train_cli.main, argv) == 2
    _one_error_line(capsys.readouterr().err, "lladav-train", *words)


def test_train_config_errors_are_one_line(monkeypatch, tmp_path, capsys):
    from lladav_jax.train import loop

    def train(config, workdir):  # what the loop's check_config raises, first thing
        assert config.train.steps == 3 and workdir == str(tmp_path)
        raise ConfigError("train.checkpoint_every=0: must be an integer >= 1")

    monkeypatch.setattr(loop, "train", train)
    argv = [*TRAIN, "--workdir", str(tmp_path), "--config.train.steps=3"]
    assert _exit_status(train_cli.main, argv) == 1
    _one_error_line(capsys.readouterr().err, "lladav-train", "train.checkpoint_every=0")


def _run(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != errors.DEBUG_ENV}
    environ.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=120)


def test_train_with_debug_shows_the_traceback():
    p = _run("lladav_jax.cli.train", *TRAIN[1:], "--workdir", "w", "--config.train.stepz=5",
             LLADAV_DEBUG="1")
    assert p.returncode == 2 and "Traceback" in p.stderr, p.stderr
    assert p.stderr.rstrip().splitlines()[-1] == (
        "lladav-train: error: unknown config key train.stepz; did you mean train.steps?")


def test_plan_checks_its_flags():
    # lladav-plan's absl flags and lladav-train's share absl's global registry (both define
    # --config): one of them runs in a subprocess.
    p = _run("lladav_jax.cli.plan", "--config", "configs/demo.py", "--topology", "v5p-8",
             "--mfu", "0")
    assert p.returncode == 2
    _one_error_line(p.stderr, "lladav-plan", "--mfu=0.0", "(0, 1]")
