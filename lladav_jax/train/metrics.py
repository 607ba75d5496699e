"""What a run reports: metrics.jsonl, TensorBoard events, a loss curve, and MFU (model FLOPs
from `models.flops`)."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import shutil
import tempfile
import time

import jax
import numpy as np
from etils import epath

from lladav_jax import paths
from lladav_jax.scale import topology


def measure_peak_flops(size: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """This device's matmul FLOP/s at `dtype`, measured (for the CPU, which has no datasheet)."""
    x = jax.random.normal(jax.random.key(0), (size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(x).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def peak_flops_per_device(configured_tflops: float = 0.0) -> float:
    """A device's peak FLOP/s for MFU: `configured_tflops` if set; else the datasheet dense
    bf16 peak of the chip jax.devices()[0] is (`topology.CHIPS`); else measured (the CPU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    chip = topology.chip_for_device_kind(jax.devices()[0].device_kind)
    if chip is not None:
        return chip.peak_tflops * 1e12
    return measure_peak_flops()


class MetricsWriter:
    """metrics.jsonl rows (one per logged step) and TensorBoard scalars, written by process 0,
    in a local workdir or a bucket (`lladav_jax.paths`).

    On resume, rows past the restored step are dropped first: a run that died between two
    checkpoints repeats those steps, and the file must read as one uninterrupted run. The rows
    are kept in memory and the whole file is rewritten: an object in a bucket cannot be
    appended to. Locally at each row; to a bucket at most every `upload_every_s` and at each
    `flush` (the loop flushes before each checkpoint, so the rows a checkpoint covers are
    never lost, and the rows after it are those a resume repeats), so a long run does not
    upload its growing file thousands of times. TensorBoard events go to WORKDIR/tensorboard;
    for a bucket they are written to a local temporary directory and copied there whole at the
    same times.
    (tensorboardX writes gs:// itself, but its writer uploads again when garbage-collected,
    with 120 s of retries at exit when the bucket is unreachable, and knows gs:// and s3://
    only.)
    """

    def __init__(self, workdir: str | os.PathLike, resume_step: int, enabled: bool = True,
                 upload_every_s: float = 60.0):
        self.enabled = enabled
        self.path = paths.as_path(workdir) / "metrics.jsonl"
        self._every = upload_every_s if paths.is_url(self.path) else 0.0
        self._saved_at = -math.inf  # the first row goes out at once
        self.tb = None
        self._rows: list[dict] = []
        self._events: tuple[pathlib.Path, epath.Path] | None = None  # (local copy, bucket)
        if not enabled:
            return
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            self._rows = [r for r in map(json.loads, filter(None, lines))
                          if r["step"] <= resume_step]
            self._save()
        from tensorboardX import SummaryWriter

        logdir = self.path.parent / "tensorboard"
        if paths.is_url(logdir):
            self._events = (pathlib.Path(tempfile.mkdtemp(prefix="lladav-tensorboard-")), logdir)
            logdir = self._events[0]
        self.tb = SummaryWriter(os.fspath(logdir))

    def rows(self) -> list[dict]:
        """The rows written (with those of the run resumed), oldest first."""
        return list(self._rows)

    def _save(self) -> None:
        paths.write_whole(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._rows.append(row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])
        if time.monotonic() - self._saved_at >= self._every:
            self.flush()

    def flush(self) -> None:
        """Writes out the rows and events held (a bucket's copy is otherwise kept current
        every `upload_every_s` only)."""
        if not self.enabled:
            return
        self._save()
        self._saved_at = time.monotonic()
        if self.tb is not None:
            self.tb.flush()
            self._copy_events()

    def _copy_events(self) -> None:
        if self._events is not None:
            local, bucket = self._events
            for file in local.iterdir():
                paths.write_whole(bucket / file.name, file.read_bytes())

    def close(self) -> None:
        if self.enabled:
            self._save()
        if self.tb is not None:
            self.tb.close()
            self._copy_events()
        if self._events is not None:
            shutil.rmtree(self._events[0], ignore_errors=True)
            self._events = None


def plot_loss(rows: list[dict], out: str | os.PathLike, title: str = "") -> None:
    """The loss curve (and learning rate) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    steps = np.array([r["step"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    losses = np.array([r["loss"] for r in rows], dtype=float)
    ax.plot(steps, losses, label="loss")
    held_out = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if held_out:  # validation rows (`eval.every`)
        ax.plot(*zip(*held_out), "o-", color="tab:green", label="held-out loss (t grid)")
        ax.legend(loc="upper right")
    finite = losses[np.isfinite(losses)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")  # the late, slow part of the curve stays visible
        # Plain tick labels: the default ones are mathtext, whose parser is not thread-safe,
        # and a notebook may draw the live curve in another thread meanwhile.
        ax.yaxis.set_major_formatter(ticker.LogFormatter())
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["learning_rate"] for r in rows], color="tab:orange", alpha=0.5, label="lr")
    ax2.set_ylabel("learning rate")
    fig.tight_layout()
    buf = io.BytesIO()  # savefig writes local files only; the bytes go anywhere
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    paths.write_whole(out, buf.getvalue())
