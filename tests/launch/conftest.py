"""The launch/ tests' fixture: recording stand-ins for gcloud, sbatch, srun and the rest."""

import os

import pytest

from tests.launch.helpers import SEP, STAND_INS


@pytest.fixture(autouse=True)
def calls(tmp_path, monkeypatch):
    """Every script here runs with recording stand-ins first on PATH, so that not even a broken
    dry run reaches a real gcloud or sbatch. Returns a function: the calls made so far."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("DRY_RUN", raising=False)
    return lambda: [line.split(SEP) for line in log.read_text().splitlines()]
