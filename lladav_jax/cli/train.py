"""The `lladav-train` command."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import flags, logging
from ml_collections import config_flags

from lladav_jax.cli import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/demo.py or configs/stage2a.py:8b.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and outputs (resumes).")
errors.define_absl_debug_flag()


def _run(argv: list[str]) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it renames at INFO
    from lladav_jax.train.loop import train

    train(_CONFIG.value, _WORKDIR.value)  # preempted or done: exit 0 either way
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """`lladav-train --config FILE --workdir DIR [--config.KEY=VALUE ...]`; argv as sys.argv
    (the program first). Exits with the status, as absl's app.run did: callers of a bare
    `main()` (`python -m lladav_jax.train`) get it too."""
    sys.exit(errors.run_absl(
        "lladav-train", _run, argv, required=("config", "workdir"),
        interrupted="interrupted; the same command resumes from the last checkpoint"))


if __name__ == "__main__":
    main()
