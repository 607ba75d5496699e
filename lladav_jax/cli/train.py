"""The `lladav-train` command."""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/demo.py or configs/stage2a.py:8b.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and outputs (resumes).")


def _run(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it renames at INFO
    from lladav_jax.train.loop import train

    summary = train(_CONFIG.value, _WORKDIR.value)
    if summary.get("preempted"):
        sys.exit(0)


def main() -> None:
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_run)
