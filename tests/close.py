"""The tolerance that the parity tests compare against."""

from __future__ import annotations

import numpy as np


def assert_close(got, want, rel: float = 1e-5) -> None:
    """Max abs difference within `rel` of the output scale (at least 1)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(1.0, float(np.abs(want).max())))
