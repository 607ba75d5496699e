"""Stopping a run by signal: SIGTERM and the first Ctrl-C ask for a checkpoint at the next
step; a Ctrl-C after either stops at once; the handlers before are put back. (A whole run stopped
either way and resumed bitwise: tests/train/test_train.py.)"""

import os
import signal

import pytest

from lladav_jax.train.checkpoint import Preemption


def test_sigterm_or_ctrl_c_asks_for_a_checkpoint_and_ctrl_c_then_stops_at_once(capfd):
    before = {s: signal.getsignal(s) for s in Preemption.SIGNALS}
    preemption = Preemption()
    try:
        assert not preemption.agreed(sync_point=True)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested == "SIGTERM" and preemption.agreed(sync_point=False)
        os.kill(os.getpid(), signal.SIGTERM)  # a second notice changes nothing
        assert preemption.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while stopping: at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preemption.restore()
    assert {s: signal.getsignal(s) for s in Preemption.SIGNALS} == before

    preemption = Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.requested == "SIGINT" and preemption.agreed(sync_point=False)
        assert "Ctrl-C: checkpointing at the end of this step" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preemption.restore()
    assert {s: signal.getsignal(s) for s in Preemption.SIGNALS} == before
