"""Accelerator topologies by name (`v5p-64`, `v6e-256`, `h100x8`, ...): chips, HBM, peak FLOP/s.

Sources (datasheet figures per chip, dense bf16, no sparsity):
- TPU v4: cloud.google.com/tpu/docs/v4 - 275 TFLOP/s, 32 GiB HBM2; `v4-N` counts TensorCores
  (2 per chip), so v4-8 is 4 chips.
- TPU v5e: cloud.google.com/tpu/docs/v5e - 197 TFLOP/s, 16 GiB HBM2; `v5e-N` (also
  `v5litepod-N`) counts chips.
- TPU v5p: cloud.google.com/tpu/docs/v5p - 459 TFLOP/s, 95 GiB HBM2e; `v5p-N` counts
  TensorCores (2 per chip): v5p-64 is 32 chips.
- TPU v6e (Trillium): cloud.google.com/tpu/docs/v6e - 918 TFLOP/s, 32 GiB HBM; counts chips.
- NVIDIA H100 SXM: H100 datasheet - 989 TFLOP/s dense bf16 (1979 is with sparsity), 80 GiB.
- NVIDIA H200 SXM: H200 datasheet - 989 TFLOP/s dense bf16, 141 GiB HBM3e.
- NVIDIA A100 SXM 80GB: A100 datasheet - 312 TFLOP/s dense bf16, 80 GiB.
The training MFU (`lladav_jax.train.metrics.peak_flops_per_device`) takes its peak from
these records too, finding the chip by the device kind jax reports (`chip_for_device_kind`).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float
    peak_tflops: float  # dense bf16, per chip
    device_kind: str  # as jax reports it (`jax.devices()[0].device_kind`)
    platform: str  # tpu | gpu
    cores_per_chip: int  # what a TPU name counts: TensorCores (v4, v5p) or chips (v5e, v6e)
    sizes: tuple[int, ...] | None  # the slice sizes that exist (None: any multiple of 8 / any)


CHIPS = {
    "v4": Chip("TPU v4", 32, 275.0, "TPU v4", "tpu", 2, None),
    "v5e": Chip("TPU v5e", 16, 197.0, "TPU v5 lite", "tpu", 1, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v5p": Chip("TPU v5p", 95, 459.0, "TPU v5p", "tpu", 2, None),
    "v6e": Chip("TPU v6e", 32, 918.0, "TPU v6 lite", "tpu", 1, (1, 4, 8, 16, 32, 64, 128, 256)),
    "h100": Chip("NVIDIA H100 SXM", 80, 989.0, "NVIDIA H100 80GB HBM3", "gpu", 1, None),
    "h200": Chip("NVIDIA H200 SXM", 141, 989.0, "NVIDIA H200", "gpu", 1, None),
    "a100": Chip("NVIDIA A100 SXM 80GB", 80, 312.0, "NVIDIA A100-SXM4-80GB", "gpu", 1, None),
}
ALIASES = {"v5litepod": "v5e"}
# Device kinds (lower case) by substring -> key of CHIPS, tried in this order.
DEVICE_KINDS = {"v6": "v6e", "v5p": "v5p", "v5 lite": "v5e", "v5e": "v5e", "v4": "v4",
                "h200": "h200", "h100": "h100", "a100": "a100"}  # fmt: skip
_TPU = re.compile(r"^(v4|v5e|v5litepod|v5p|v6e)-(\d+)$")
_GPU = re.compile(r"^(h100|h200|a100)x(\d+)$")


class TopologyError(ValueError):
    """An unknown or impossible topology name."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    family: str  # key of CHIPS
    chip: Chip
    chips: int  # per slice (a TPU slice, or the GPUs named)

    @property
    def peak_flops(self) -> float:
        return self.chip.peak_tflops * 1e12


def parse(name: str) -> Topology:
    """`v5p-64` -> 32 v5p chips; `v6e-256` -> 256 chips; `h100x8` -> 8 GPUs."""
    key = name.strip().lower()
    match = _TPU.match(key) or _GPU.match(key)
    if match is None:
        raise TopologyError(
            f"unknown topology {name!r}: use v4-N, v5e-N (v5litepod-N), v5p-N, v6e-N (TPU "
            "slices, N as in the accelerator type) or h100xN, h200xN, a100xN (GPUs)")
    family, n = ALIASES.get(match[1], match[1]), int(match[2])
    chip = CHIPS[family]
    if n < 1 or (chip.sizes is not None and n not in chip.sizes):
        raise TopologyError(f"{name}: {family} slices come in sizes {chip.sizes}")
    if chip.cores_per_chip > 1 and (n < 8 or n % 8):
        # v4 / v5p names count TensorCores; a host has 4 chips = 8 cores.
        raise TopologyError(f"{name}: {family}-N counts TensorCores; N is a multiple of 8")
    return Topology(key, family, chip, n // chip.cores_per_chip)


def chip_for_device_kind(kind: str) -> Chip | None:
    """The chip a device kind (`jax.devices()[0].device_kind`) names; None if unknown (the CPU,
    other accelerators)."""
    kind = kind.lower()
    return next((CHIPS[key] for sub, key in DEVICE_KINDS.items() if sub in kind), None)


def names() -> list[str]:
    """Examples of valid names, for help texts."""
    return ["v4-8", "v5e-256", "v5p-64", "v6e-256", "h100x8", "h200x8", "a100x8"]
