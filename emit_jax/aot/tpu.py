"""The abstract TPU slice: libtpu (needed), ``--topology`` as jax's abstract devices, and the HBM
of each device (by device kind, or ``--hbm``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile

from emit_jax.errors import AotError
from emit_jax.plan.devices import GiB

# HBM per chip by jax's device_kind; a chip of several devices (v2-v4 cores) shares it
HBM_PER_CHIP: dict[str, tuple[int, str]] = {
    "TPU v5": (95 * GiB, "TPU v5p chip, 95 GiB HBM2e"),
    "TPU v5p": (95 * GiB, "TPU v5p chip, 95 GiB HBM2e"),
    "TPU v5 lite": (16 * GiB, "TPU v5e chip, 16 GiB HBM2"),
    "TPU v5e": (16 * GiB, "TPU v5e chip, 16 GiB HBM2"),
    "TPU v6 lite": (32 * GiB, "TPU v6e chip, 32 GiB HBM"),
    "TPU v6e": (32 * GiB, "TPU v6e chip, 32 GiB HBM"),
    "TPU v4": (32 * GiB, "TPU v4 chip, 32 GiB HBM2"),
    "TPU v3": (32 * GiB, "TPU v3 chip, 32 GiB HBM"),
    "TPU v2": (16 * GiB, "TPU v2 chip, 16 GiB HBM"),
}
LIBTPU_MISSING = "libtpu is not installed: pip install -e '.[tpu-aot]'"


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(LIBTPU_MISSING)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (libtpu's C++ start-up warnings about the missing TPU
    hardware, written straight to it) for the duration; Python exceptions pass through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def topology(name: str):
    """``jax.experimental.topologies.get_topology_desc`` of a TPU slice name (``v5e:2x2``)."""
    require_libtpu()
    if not re.fullmatch(r"[\w.-]+:\d+(x\d+)*", name or ""):
        raise AotError(f"bad --topology {name!r}: expected GENERATION:AxB[xC], e.g. v5e:2x2, "
                       f"v5p:2x2x1, v6e:2x4")
    # libtpu takes /tmp/libtpu_lockfile so that two processes do not drive the same chips;
    # compiling drives none, so several compilations (and a test's children) may run at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if max(check_slice_size(name)) > CHECKED_SIDE:
        _check_compiles(name)
    from jax.experimental import topologies

    try:
        with _quiet_stderr():
            return topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # noqa: BLE001 - libtpu's own words on a name it does not know
        msg = " ".join(str(e).split())
        what = "unknown topology" if msg.startswith("INVALID_ARGUMENT") else "topology"
        raise AotError(f"{what} {name!r}: {msg.removeprefix('INVALID_ARGUMENT: ')}") from None


#: the most chips of a slice: a v5p pod has 8,960 (before: v5p:64x64x64, 262,144 chips, sat
#: in libtpu for minutes without a word)
MAX_CHIPS = 8960
#: the longest side of the 2-D generations' slices (v5e and v6e pods are 16 x 16 = 256 chips;
#: libtpu made v6e:32x32 and compiled for it, a slice that does not exist)
MAX_SIDE_2D = {"v5e": 16, "v5litepod": 16, "v6e": 16}


def check_slice_size(name: str) -> list[int]:
    """The sides of the slice ``name`` (``GEN:AxB[xC]``); :class:`AotError` when it is larger
    than any pod of its generation (:data:`MAX_SIDE_2D`) or than :data:`MAX_CHIPS`, before
    libtpu is asked."""
    import math

    gen, _, dims = name.partition(":")
    sides = [int(d) for d in dims.split("x")]
    chips = math.prod(sides)
    side = MAX_SIDE_2D.get(gen.lower())
    if side is not None and max(sides) > side:
        raise AotError(f"topology {name!r}: a {gen} slice is at most {side}x{side} chips (a whole "
                       f"pod); choose a smaller slice")
    if chips > MAX_CHIPS:
        raise AotError(f"topology {name!r}: {chips} chips, more than any TPU pod ({MAX_CHIPS}, "
                       "v5p's); choose a smaller slice")
    return sides


#: slices with a side above this are compiled for once in a child process first: libtpu makes
#: the topology of any size but aborts the process when it compiles for one its generation does
#: not have (``v5e:32x32``: ``Check failed: chip_bounds().x <= 16``, 39 lines and SIGABRT)
CHECKED_SIDE = 16

_PREFLIGHT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
devices = np.array(topologies.get_topology_desc(platform="tpu", topology_name=sys.argv[1]).devices)
s = NamedSharding(Mesh(devices.reshape(-1), ("d",)), P("d"))
jax.jit(lambda x: x * 2, in_shardings=s, out_shardings=s).lower(
    jax.ShapeDtypeStruct((devices.size,), jnp.float32, sharding=s)).compile()
"""


def _check_compiles(name: str) -> None:
    """Raise :class:`AotError` when libtpu aborts compiling a one-line program for the slice
    ``name`` (run in a child: the abort ends the process), with libtpu's failed check."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", _PREFLIGHT, name], capture_output=True, text=True,
                       env=dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
    if r.returncode == 0:
        return
    found = re.search(r"Check failed: (.*)", r.stderr)
    why = " ".join(found.group(1).split()) if found else \
        (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    raise AotError(f"topology {name!r}: libtpu cannot compile for this slice ({why}); choose "
                   "a slice this TPU generation has (the bound above is libtpu's)")


def device_capacity(devices, hbm_gib: float | None = None) -> tuple[int, str]:
    """(bytes of HBM per device, where the number comes from): ``hbm_gib`` per device when
    given, else the chip's HBM by device kind over the devices that share a chip."""
    kind = devices[0].device_kind
    if hbm_gib is not None:
        if not hbm_gib > 0:
            raise AotError(f"--hbm {hbm_gib:g}: GiB per device, positive")
        return int(hbm_gib * GiB), f"{kind}, --hbm {hbm_gib:g} GiB per device"
    if kind not in HBM_PER_CHIP:
        raise AotError(f"HBM of {kind!r} devices is not known here; pass --hbm GIB (per device)")
    chip, note = HBM_PER_CHIP[kind]
    per_chip = {}
    for d in devices:
        key = tuple(getattr(d, "coords", (d.id,)))
        per_chip[key] = per_chip.get(key, 0) + 1
    n = max(per_chip.values())
    if n > 1:
        note += f", {n} devices per chip: {chip / n / GiB:g} GiB each"
    return chip // n, note
