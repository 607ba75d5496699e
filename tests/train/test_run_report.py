"""What a run reports: where the time went (goodput), real and padded MFU, validation rows,
W&B; and that the loop does not wait for the chips between logging steps."""

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lladav_jax.models import lladav
from lladav_jax.scale import sharding
from lladav_jax.train import checkpoint, loop, validation
from lladav_jax.train.bookkeeping import TIMERS, Bookkeeping, LogWindow, StepClock
from lladav_jax.train.inputs import load_tokenizer, make_featurizer
from lladav_jax.train.wandb_log import WandbLog
from tests.train.test_train import rows_of, small_config


@pytest.mark.slow
def test_rows_say_where_the_time_went_and_hold_validation(tmp_path):
    workdir = tmp_path / "run"
    loop.train(small_config({"eval.every": 4, "eval.samples": 12, "train.log_every": 2}),
               str(workdir))
    rows = rows_of(workdir)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for r in rows:
        spent = sum(r[k] for k in TIMERS)
        assert all(r[k] >= 0 for k in TIMERS)
        assert spent <= r["step_s"] * 2 + 1e-6  # two steps per row
        assert r["goodput"] == pytest.approx(1 - spent / (r["step_s"] * 2))
        # Real work (non-padding tokens, own-sample attention) is less than what was computed.
        assert 0 < r["mfu"] < r["mfu_padded"]
    assert rows[1]["eval_s"] > 0 and rows[0]["eval_s"] == 0
    held_out = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in held_out] == [4, 8]
    for r in held_out:
        grid = [r[f"eval_loss_t{t:g}"] for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
        assert np.isfinite(grid).all() and r["eval_loss"] == pytest.approx(np.mean(grid))
        assert 0 <= r["eval_accuracy"] <= 1 and r["eval_answers"] == 12
    assert (workdir / "loss.png").stat().st_size > 0


def test_validation_is_deterministic_and_sees_the_answers():
    config = small_config({"eval.every": 1, "eval.samples": 8})
    tok = load_tokenizer("")
    rules = sharding.logical_rules(())
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    v = validation.make_validation(config, tok, mesh, rules)
    model = lladav.create(config.model, seed=0, mesh=mesh, rules=rules)
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    with sharding.sharding_context(mesh, rules):
        first, again = v(graphdef, trainable, frozen), v(graphdef, trainable, frozen)
    assert first == again
    assert first["eval_answers"] == 8 and np.isfinite(first["eval_loss"])
    # The answer of a synthetic sample is its one word's tokens, between the header's blank
    # line and <|eot_id|>.
    source, featurize = validation.eval_source(config), make_featurizer(config, tok)
    for raw in (source[i] for i in range(8)):
        ex = featurize(raw)
        start, end = validation.answer_span(ex, tok)
        assert ex.tokens[start:end].tolist() == tok.encode(raw["answer"])


def test_a_held_out_set_is_required_outside_synthetic_data():
    config = small_config({"eval.every": 10, "data.source": "llava_json"})
    with pytest.raises(ValueError, match=r"data\.eval_path"):
        validation.eval_source(config)


class _Rows:
    def __init__(self):
        self.rows = []

    def write(self, row):
        self.rows.append(row)


def _window(book=None):
    writer = _Rows()
    window = LogWindow(book or Bookkeeping.start(0), [writer], {"llm": lambda s: 1e-3},
                       peak_flops=1e9, n_devices=1, max_nonfinite_in_a_row=5)
    return window, writer


def _step(window, n=1):
    for _ in range(n):
        window.add({"loss": 1.0, "grad_norm": 1.0, "skipped": False}, samples=2, tokens=10,
                   flops=1e6, flops_padded=2e6)


def test_an_input_bound_window_is_named_once(capsys):
    window, writer = _window()
    _step(window, 4)
    window.spend("data_wait_s", 3600.0)  # more than the window's wall time: input-bound
    window.write_row(4)
    _step(window, 4)
    window.spend("data_wait_s", 3600.0)
    window.write_row(8)
    err = capsys.readouterr().err
    assert err.count("input-bound") == 1 and "at step 4" in err
    _step(window, 4)
    window.write_row(12)  # fed again: no warning, goodput back up
    assert "input-bound" not in capsys.readouterr().err
    assert writer.rows[-1]["data_wait_s"] == 0 and writer.rows[-1]["goodput"] == 1.0


def test_the_step_clock_knows_when_the_chips_ran_out_of_work():
    """Data waits count only once the dispatched steps are done: busy chips -> None."""
    released = threading.Event()
    busy = jax.jit(lambda m: m @ m)
    held = jax.jit(lambda m: (jax.debug.callback(lambda _: released.wait(60), m[0, 0]), m)[1])
    m = jnp.ones((512, 512))
    released.set()
    held(busy(m)).block_until_ready()  # compiled
    released.clear()
    clock = StepClock()
    try:
        assert clock.idle_since() == -float("inf")  # nothing dispatched: idle from the start
        dispatched = time.perf_counter()
        # Queued behind a matmul, so dispatched asynchronously (XLA:CPU runs a program
        # on an idle device in the calling thread), as a train step behind the one before.
        clock.dispatched(held(busy(m)))
        assert clock.idle_since() is None  # held on the chips
        released.set()
        deadline = time.monotonic() + 60
        while clock.idle_since() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert clock.idle_since() >= dispatched
    finally:
        released.set()
        clock.close()


def test_local_skips_are_settled_into_the_run_counts():
    book = Bookkeeping.start(0)
    window, writer = _window(book)
    book.count_skips({"too_long": 2})
    book.count_skips({"corrupt_image": 1}, local=True)
    _step(window)
    window.write_row(1)
    assert writer.rows[0]["skipped_too_long"] == 2
    assert writer.rows[0]["skipped_corrupt_image"] == 1
    assert not book.local_skips and "local_skips" not in book.to_json()


def test_several_processes_agree_on_preemption_only_at_sync_points(monkeypatch):
    """On several processes a check is a collective (it waits for the chips): only at the
    steps the loop names as sync points."""
    from jax.experimental import multihost_utils

    calls = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: calls.append(x) or np.stack([x, np.array([True])]))
    p = checkpoint.Preemption()
    try:
        assert [p.agreed(sync_point=False) for _ in range(5)] == [False] * 5
        assert calls == []
        assert p.agreed(sync_point=True) and len(calls) == 1  # the other process was told
    finally:
        p.restore()


@pytest.mark.slow
def test_the_loop_does_not_wait_for_the_chips_between_logging_steps(tmp_path, monkeypatch):
    """Step 2's computation is held (a host callback) until the loop has dispatched step 5: a
    loop that waited for any step's result before dispatching the next would never release
    it (the hold times out and says so). Logging every 6 steps."""
    released, timed_out = threading.Event(), []

    def hold(_):
        if not released.is_set():
            timed_out.append(not released.wait(timeout=60))

    gate = jax.jit(lambda x: (jax.debug.callback(hold, x), x)[1])
    original = loop.jit_train_step

    def gated_step(*args, **kwargs):
        real, calls = original(*args, **kwargs), []

        def step(state, frozen, batch):
            calls.append(1)
            if len(calls) == 2:
                state = dataclasses.replace(state, step=gate(state.step))
            out = real(state, frozen, batch)
            if len(calls) == 5:
                released.set()
            return out

        return step

    monkeypatch.setattr(loop, "jit_train_step", gated_step)
    loop.train(small_config({"train.log_every": 6, "train.steps": 6,
                             "train.checkpoint_every": 100}), str(tmp_path / "run"))
    assert released.is_set() and timed_out == [False] * len(timed_out) and timed_out


def test_wandb_offline_gets_the_rows(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = ml_collections.ConfigDict(dict(project="lladav-test", entity="", name="",
                                              mode="offline"))
    log = WandbLog(settings, str(tmp_path), ml_collections.ConfigDict({"seed": 0}))
    log.write({"step": 1, "loss": 2.5, "mfu": None})
    log.write({"step": 2, "loss": 2.0, "mfu": None})
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    with pytest.raises(ValueError, match=r"wandb\.mode"):
        WandbLog(ml_collections.ConfigDict(dict(project="p", entity="", name="", mode="x")),
                 str(tmp_path), ml_collections.ConfigDict())


def test_the_loss_plot_parses_no_mathtext(tmp_path, monkeypatch):
    """loss.png's log-scale tick labels are plain text: mathtext's parser is shared and not
    thread-safe, and the notebook redraws its live curve in a thread while the trainer draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib._mathtext as mathtext

    from lladav_jax.train import metrics

    def refuse(*args, **kwargs):
        raise AssertionError("mathtext parsed")

    monkeypatch.setattr(mathtext.Parser, "parse", refuse)
    rows = [{"step": s, "loss": 5.0 / s, "learning_rate": 1e-3} for s in range(1, 300)]
    metrics.plot_loss(rows, tmp_path / "loss.png", title="t")  # 5.0 .. 0.017: log scale
    assert (tmp_path / "loss.png").stat().st_size > 1000
