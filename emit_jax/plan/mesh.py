"""Meshes and sharded bytes: ``--mesh`` / ``--devices`` as (data, fsdp, tensor), an abstract
mesh of that shape, and the per-device bytes of an array with logical axes on it (what
:func:`emit_jax.parallel.logical_to_spec` makes of them)."""

from __future__ import annotations

import math
import re
from typing import Sequence

from emit_jax.errors import PlanError
from emit_jax.limits import MAX_DEVICES


def resolve_mesh(spec: str, devices: int | None = None) -> tuple[int, int, int]:
    """``--mesh`` (and ``--devices``) -> (data, fsdp, tensor). Without ``devices`` the device
    count is the product of the sizes named; an axis left to -1 then needs ``devices``."""
    from emit_jax import parallel

    if not spec.strip():  # before: planned the default mesh, as if --mesh were not given
        raise PlanError("--mesh '': empty; name the sizes (e.g. fsdp=8) or leave --mesh out")
    try:
        axes = parallel.parse_mesh(spec)
    except ValueError as e:
        raise PlanError(f"bad --mesh {spec!r}: {e}") from None
    if devices is None:
        named = set(re.findall(r"(\w+)\s*=", spec))
        rest = [a for a, v in axes.items() if v == -1]
        if rest and rest[0] in named:
            raise PlanError(f"--mesh {spec!r} leaves {rest[0]} as the rest of the devices (-1); "
                            f"name every size or pass --devices N")
        devices = math.prod(v for v in axes.values() if v != -1)  # unnamed axes: 1
    if devices < 1:
        raise PlanError(f"--devices {devices}: must be positive")
    if devices > MAX_DEVICES:  # before: planned for 4.6e18 devices
        raise PlanError(f"--mesh {spec!r} spans {devices} devices; at most {MAX_DEVICES}")
    try:
        return parallel.mesh_shape(spec, devices)
    except ValueError as e:
        raise PlanError(f"bad --mesh {spec!r}: {e}") from None


def abstract_mesh(shape: Sequence[int]):
    import jax

    from emit_jax.parallel import MESH_AXES

    try:
        return jax.sharding.AbstractMesh(tuple(shape), MESH_AXES)
    except TypeError:  # older signature: ((name, size), ...)
        return jax.sharding.AbstractMesh(tuple(zip(MESH_AXES, shape)))


def shards(axes, shape, mesh, rules=None) -> int:
    """Into how many pieces ``logical_to_spec`` cuts an array (1: replicated)."""
    from emit_jax.parallel import logical_to_spec

    spec = logical_to_spec(tuple(axes), tuple(shape), mesh, rules)
    n = 1
    for entry in spec:
        for a in ((entry,) if isinstance(entry, str) else (entry or ())):
            n *= mesh.shape[a]
    return n


def array_bytes(shape, bits: float, axes, mesh, rules=None) -> tuple[int, int]:
    """(per-device bytes, whole bytes) of an array with logical ``axes``."""
    whole = math.ceil(math.prod(shape) * bits / 8)
    return math.ceil(whole / shards(axes or (), shape, mesh, rules)) if axes else whole, whole
