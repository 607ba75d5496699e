"""Test set-up: JAX on the CPU with 8 simulated devices (for the sharding tests)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# 8 simulated devices on 2 busy cores can deadlock in a collective under XLA:CPU's concurrency
# scheduler (seen here); the plain scheduler does not.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
    flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["XLA_FLAGS"] = flags.strip()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: trains, converts or compiles at scale (minutes); "
        "`-m \"not slow\"` skips them, CI runs everything")
