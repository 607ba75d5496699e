"""Multi-process start: `jax.distributed` on a TPU pod slice, under SLURM, or explicitly."""

from __future__ import annotations

import os

import jax


def _cluster_detected() -> bool:
    """A TPU pod slice or a multi-task SLURM job: jax.distributed finds its peers itself.
    `LLADAV_DISTRIBUTED=1` (set by launch/tpu.sh) says so where no variable does: a Cloud TPU
    VM's hosts learn their peers from the metadata server, which jax reads itself."""
    env = os.environ
    tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in tpu_hosts or int(env.get("SLURM_NTASKS", "1")) > 1 or (
        "MEGASCALE_COORDINATOR_ADDRESS" in env) or env.get("LLADAV_DISTRIBUTED") == "1"


def initialize_distributed(settings) -> None:
    """Starts multi-process JAX per `settings` (`mode`: auto | explicit | off; `coordinator`,
    `num_processes`, `process_id` for explicit). A no-op once started or for one process."""
    if settings.mode == "off" or jax.distributed.is_initialized():
        return
    if settings.mode == "explicit":
        if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
            # CPU processes exchange collectives over gloo (tests, simulated clusters).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
    elif settings.mode == "auto":
        if _cluster_detected():
            jax.distributed.initialize()
    else:
        raise ValueError(f"distributed.mode {settings.mode!r}: choose auto, explicit or off")
