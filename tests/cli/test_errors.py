"""The shared failure handling of the commands (`lladav_jax.cli.errors`)."""

import logging

import pytest
from absl import logging as absl_logging

from lladav_jax.cli import errors
from lladav_jax.train.config_check import ConfigError
from lladav_jax.train.defaults import base_config


def _raise(exc):
    def body():
        raise exc
    return body


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)


@pytest.mark.parametrize("exc", [
    ConfigError("train.steps=-1: must be an integer >= 0"),
    FileNotFoundError(2, "No such file or directory", "x.json"),
    FileExistsError("out exists"), NotADirectoryError("d"), PermissionError("p"),
])
def test_expected_failures_are_one_line(exc, capsys):
    assert errors.run("lladav-x", _raise(exc), []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lladav-x: error: ")
    assert "Traceback" not in err


def test_own_runtime_errors_are_expected(capsys):
    from lladav_jax.train.bookkeeping import NonFiniteLossError

    exc = NonFiniteLossError("loss is NaN for 20 steps in a row\nLower the learning rate")
    assert errors.run("lladav-train", _raise(exc), []) == 1
    err = capsys.readouterr().err
    # Several lines stay readable: the first after `error:`, the rest indented, no traceback.
    assert err == ("lladav-train: error: NonFiniteLossError: loss is NaN for 20 steps in a row\n"
                   "  Lower the learning rate\n")


def test_a_bug_keeps_its_traceback_and_says_to_report_it(capsys):
    assert errors.run("lladav-x", _raise(KeyError("oops")), []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'oops'" in err
    assert err.rstrip().splitlines()[-1].startswith("lladav-x: internal error (KeyError)")


def test_debug_shows_the_traceback(monkeypatch, capsys):
    exc = ValueError("bad")
    assert errors.run("lladav-x", _raise(exc), ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    assert errors.run("lladav-x", _raise(exc), []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("lladav-x: error: bad")


def test_ctrl_c_is_one_line_and_130(capsys):
    assert errors.run("lladav-x", _raise(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "lladav-x: interrupted\n"


def test_usage_errors_exit_2(capsys):
    assert errors.run("lladav-x", _raise(errors.UsageError("--workdir is required")), []) == 2
    assert capsys.readouterr().err == "lladav-x: error: --workdir is required\n"


@pytest.mark.parametrize(("key", "words"), [
    ("train.stepz", "did you mean train.steps?"),
    ("train.batch_size", "did you mean data.batch_size?"),  # the right name, the wrong section
    ("optim.lr.visoin", "did you mean optim.lr.vision?"),
    ("optim.zzzzzz", "optim has b1, b2, clip_norm"),  # nothing near: what the section holds
])
def test_unknown_config_key(key, words):
    message = errors.unknown_key_message(key, errors.flat_keys(base_config()))
    assert message.startswith(f"unknown config key {key}; ") and words in message


def test_quiet_logs_drop_only_the_lines_a_user_cannot_act_on(caplog):
    errors.quiet_logs()
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl_logging.warning("Metadata file does not exist: %s", "/w/checkpoints/_METADATA")
        absl_logging.warning("a real warning")
    assert [r.getMessage() for r in caplog.records] == ["a real warning"]
