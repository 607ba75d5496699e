"""What a run reports: metrics.jsonl, TensorBoard events, a loss curve, and MFU (model FLOPs
from `models.flops`)."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from lladav_jax.scale import topology


def measure_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """This device's float32 matmul FLOP/s, measured (for the CPU, which has no datasheet)."""
    x = jax.random.normal(jax.random.key(0), (size, size))
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
    """metrics.jsonl rows (one per logged step) and TensorBoard scalars, written by process 0.

    On resume, rows past the restored step are dropped first: a run that died between two
    checkpoints repeats those steps, and the file must read as one uninterrupted run.
    """

    def __init__(self, workdir: str | pathlib.Path, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            rows = [r for r in self.rows() if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss(rows: list[dict], out: str | pathlib.Path, title: str = "") -> None:
    """The loss curve (and learning rate) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    losses = np.array([r["loss"] for r in rows], dtype=float)
    ax.plot(steps, losses, label="loss")
    finite = losses[np.isfinite(losses)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")  # the late, slow part of the curve stays visible
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["learning_rate"] for r in rows], color="tab:orange", alpha=0.5, label="lr")
    ax2.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
