"""Test set-up: JAX on the CPU with 8 simulated devices (for the sharding tests); a GCS
emulator for the tests of bucket workdirs (`gcs`)."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# 8 simulated devices on 2 busy cores can deadlock in a collective under XLA:CPU's concurrency
# scheduler (seen here); the plain scheduler does not.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
    flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["XLA_FLAGS"] = flags.strip()
# Read once, when gcsfs is imported (whichever test imports it first): see tests/gcs_emulator.py.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


# The longest test files, longest first (a `--durations` run under `-n 2`, 2026-12-01, a file's
# tests summed). Each goes to a worker whole (pytest.ini), so starting these first keeps the end
# of the run from waiting on one of them while the other worker idles.
LONGEST_FIRST = (
    "tests/train/test_train.py",
    "tests/test_readme.py",
    "tests/test_notebook.py",
    "tests/train/test_checkpoint_faults.py",
    "tests/train/test_run_report.py",
    "tests/train/test_answer_length.py",
    "tests/train/test_answer_length_digits.py",
    "tests/train/test_integrity.py",
    "tests/train/test_gcs_workdir.py",
    "tests/train/test_bad_data_runs.py",
    "tests/train/test_lora.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath
    items.sort(key=lambda item: rank.get(item.path.relative_to(root).as_posix(), len(rank)))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: trains, converts or compiles at scale (minutes); "
        "`-m \"not slow\"` skips them, CI runs everything")


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator with an empty bucket (`tests.gcs_emulator.Emulator`), for the session;
    its variables are in os.environ meanwhile, so subprocesses inherit them."""
    from tests import gcs_emulator

    with gcs_emulator.running() as emulator:
        yield emulator
