"""The README's main command runs and reports what it did."""

import subprocess
import sys


def test_demo_runs():
    out = subprocess.run(
        [sys.executable, "-m", "lladav_jax.demo"], capture_output=True, text=True, timeout=300,
        check=True,
    ).stdout
    assert "1485" not in out  # tiny tiles: the 8b count would mean the wrong config
    assert "visual tokens" in out and "finite: True" in out
    assert "8b: text 8,015,581,184" in out
