"""Weights & Biases, optional: `--config.wandb.project=NAME` sends every metrics row there too.

    lladav-train --config configs/demo.py --workdir /tmp/d --config.wandb.project=lladav
    ... --config.wandb.mode=offline   # no network: `wandb sync` the run directory later

Process 0 logs. The run id is derived from the workdir, so a resumed run continues the same
W&B run (a resume repeats steps bitwise, and W&B keeps the values a step had first). The W&B
files go to the workdir's `wandb/` on a local workdir, to a temporary directory for a bucket
workdir.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_collections

MODES = ("online", "offline", "disabled")


class WandbLog:
    """Sends metrics rows to a W&B run (a no-op where `settings.project` is empty)."""

    def __init__(self, settings: ml_collections.ConfigDict, workdir: str,
                 config: ml_collections.ConfigDict, enabled: bool = True):
        self.run = None
        if not settings.project or not enabled:
            return
        if settings.mode not in MODES:
            raise ValueError(f"wandb.mode {settings.mode!r}: choose one of {MODES}")
        try:
            import wandb
        except ImportError as e:
            raise ImportError("wandb.project is set but wandb is not installed: "
                              "pip install wandb") from e
        local = "://" not in workdir
        directory = workdir if local else tempfile.mkdtemp(prefix="lladav-wandb-")
        run_id = hashlib.sha1(workdir.encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=settings.project, entity=settings.entity or None,
            name=settings.name or workdir.rstrip("/").rsplit("/", 1)[-1],
            id=run_id, resume="allow", dir=directory, mode=settings.mode,
            config=config.to_dict())

    def write(self, row: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        self.run.log({k: v for k, v in row.items() if k != "step" and v is not None},
                     step=row["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
