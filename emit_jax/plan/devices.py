"""The devices a plan is checked against: bytes of memory per device, and where each number
comes from (``--device``)."""

from __future__ import annotations

import os

from emit_jax.errors import PlanError

GiB = 2 ** 30

# device -> (bytes of memory per device, where the number comes from)
DEVICES: dict[str, tuple[int, str]] = {
    "a100-80g": (81920 * 2 ** 20, "NVIDIA A100 80GB, 81920 MiB (nvidia-smi)"),
    "h100-80g": (81559 * 2 ** 20, "NVIDIA H100 80GB HBM3, 81559 MiB (nvidia-smi)"),
    "h200": (143771 * 2 ** 20, "NVIDIA H200 141GB, 143771 MiB (nvidia-smi)"),
    "v5p": (95 * GiB, "TPU v5p chip, 95 GiB HBM2e"),
    "v4": (32 * GiB, "TPU v4 chip, 32 GiB HBM2"),
    "cpu": (0, "this machine's RAM (os.sysconf)"),
}


def cpu_ram_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_capacity(name: str) -> int:
    if name not in DEVICES:
        raise PlanError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
    return cpu_ram_bytes() if name == "cpu" else DEVICES[name][0]
