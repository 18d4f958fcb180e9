"""Device meshes, logical-axis sharding rules and activation constraints.

The mesh has the axes ``data``, ``fsdp`` and ``tensor`` (:data:`MESH_AXES`), sized from a spec
string or mapping (:func:`parse_mesh`, :func:`mesh_shape`, :func:`make_mesh`). Every parameter's
logical axis names (``emit_jax.models.layers``; LoRA factors and optimizer moments inherit them)
are mapped to mesh axes by :data:`DEFAULT_RULES` (:func:`logical_to_spec`,
:func:`state_shardings`); batches are split over ``data`` x ``fsdp`` along their first axis
(:func:`batch_spec`). Activations get sharding constraints at block boundaries
(:func:`constrain`, :func:`constrain_hidden`), a no-op outside :func:`use_mesh`.

A mesh axis that does not divide a dimension is dropped for that dimension (the dimension is
replicated over it) rather than failing: the tiny model's 2 key/value heads or InternVL3's
151,674-entry vocabulary stay valid on any mesh. The ``PartitionSpec`` that
:func:`logical_to_spec` returns (per array: :func:`state_shardings`) shows what was replicated.

Mesh spec strings: ``"fsdp=8"``, ``"data=2,fsdp=2,tensor=2"``, ``"data=-1"``; ``-1`` means the
devices the other axes leave (at most one axis may say so; axes not named are 1, except that
with no ``-1`` anywhere and fewer devices named than present, ``fsdp`` takes the rest).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of axes, or None = replicated). FSDP shards the model
# width (the parameters' "embed" side), tensor parallelism the heads / MLP / vocabulary side.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"), ("vit_embed", "fsdp"), ("mm_in", "fsdp"),
    ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
    ("vit_heads", "tensor"), ("vit_mlp", "tensor"), ("mm_hidden", "tensor"),
    ("norm", None), ("vit_pos", None), ("conv_h", None), ("conv_w", None), ("conv_in", None),
    ("layers", None),  # the stacked axis of scan_layers (emit_jax.models.scan)
    # activations at block boundaries: [batch, sequence, width]
    ("act_seq", None), ("act_embed", None),
)


# ------------------------------------------------------------------------------------ mesh
def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` (or a mapping) -> ``{"data": 2, "fsdp": -1, "tensor": 1}``."""
    if spec is None or spec == "":
        return {"data": 1, "fsdp": -1, "tensor": 1}
    if isinstance(spec, str):
        items = {}
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not axis=size "
                                 f"(axes: {', '.join(MESH_AXES)})")
            k, v = part.split("=", 1)
            if k in items:  # before: the last one silently won
                raise ValueError(f"mesh spec {spec!r}: axis {k!r} is given twice; give it once")
            try:
                items[k] = int(v)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size of {k!r} is not an integer") from None
        spec = items
    spec = dict(spec)
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh spec names unknown axes {sorted(unknown)}; axes: {MESH_AXES}")
    out = {a: int(spec.get(a, 1)) for a in MESH_AXES}
    if not any(v == -1 for v in out.values()) and "fsdp" not in spec:
        out["fsdp"] = -1
    for a, v in out.items():
        if v == 0 or v < -1:
            raise ValueError(f"mesh axis {a}={v}: sizes are positive, or -1 for the rest")
    if sum(v == -1 for v in out.values()) > 1:
        raise ValueError(f"mesh spec {spec}: at most one axis may be -1")
    return out


def mesh_shape(spec, num_devices: int) -> tuple[int, int, int]:
    """Resolve ``-1`` against ``num_devices``; the product must equal it."""
    axes = parse_mesh(spec)
    known = math.prod(v for v in axes.values() if v != -1)
    if any(v == -1 for v in axes.values()):
        if num_devices % known:
            raise ValueError(f"mesh {axes}: the fixed axes ({known} devices) do not divide the "
                             f"{num_devices} devices")
        axes = {a: (num_devices // known if v == -1 else v) for a, v in axes.items()}
    total = math.prod(axes.values())
    if total != num_devices:
        raise ValueError(f"mesh {axes} needs {total} devices, but {num_devices} are present "
                         f"(use -1 for one axis to take the rest)")
    return tuple(axes[a] for a in MESH_AXES)


def make_mesh(spec=None, devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` with axes ``(data, fsdp, tensor)`` over ``devices`` (default: all, global in a
    multi-process run). ``tensor`` is the fastest-varying axis, so it stays inside a host."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - unusual topologies: plain order
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


#: the sampler's meshes (:func:`sampler_mesh`)
SAMPLER_MESHES = ("learner", "replicated", "tensor")


def sampler_mesh(mesh: Mesh, mode: str) -> Mesh:
    """The mesh GRPO's sampler runs on, over the devices of the learner's ``mesh`` ``(data,
    fsdp, tensor)``: ``learner`` is ``mesh`` itself (FSDP's shards of the width are all-gathered
    inside every decode step by the TPU compiler; XLA:CPU hoists the gathers before the loop);
    ``replicated`` is ``(data * fsdp * tensor, 1, 1)`` (every device holds every weight, the
    prompts split over all); ``tensor`` is ``(data, 1, fsdp * tensor)`` (the weights over heads
    / MLP / vocabulary by :data:`DEFAULT_RULES`, none over the width; the prompts over
    ``data``). Either way no weight is gathered per decode step; the devices
    keep the learner mesh's order."""
    if mode not in SAMPLER_MESHES:
        raise ValueError(f"sampler mesh {mode!r}: one of {SAMPLER_MESHES}")
    if mode == "learner":
        return mesh
    d, f, t = (mesh.shape[a] for a in MESH_AXES)
    shape = (d * f * t, 1, 1) if mode == "replicated" else (d, 1, f * t)
    return Mesh(mesh.devices.reshape(shape), MESH_AXES)


# ------------------------------------------------------------------------------------ rules
def _rule_map(rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, target in (DEFAULT_RULES if rules is None else rules):
        if target is None:
            out[name] = ()
        elif isinstance(target, str):
            out[name] = (target,)
        else:
            out[name] = tuple(target)
    return out


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules=None) -> P:
    """The ``PartitionSpec`` for an array of ``shape`` whose dimensions have logical ``axes``.

    Mesh axes of size 1, already used by an earlier dimension, or not dividing the dimension
    are dropped (that dimension is replicated over them)."""
    if not axes or len(axes) != len(shape):
        return P()
    rmap = _rule_map(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        chosen = []
        for m in rmap.get(name, ()) if name is not None else ():
            size = mesh.shape[m]
            if size == 1 or m in used:
                continue
            if dim % (math.prod(mesh.shape[c] for c in chosen) * size):
                continue
            chosen.append(m)
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _var_axes(v: nnx.Variable):
    meta = v.get_metadata()
    axes = meta.get("out_sharding", meta.get("sharding_names", meta.get("sharding")))
    return axes if isinstance(axes, (tuple, list)) else None


def state_shardings(state, mesh: Mesh, rules=None):
    """A pytree like ``state`` (an ``nnx.State``) holding one ``NamedSharding`` per array,
    from each Variable's logical axis names (none: replicated)."""
    def one(v):
        if _is_var(v):
            val = v.get_value()
            shape = getattr(val, "shape", ())
            return v.replace(NamedSharding(mesh, logical_to_spec(_var_axes(v), shape, mesh, rules)))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, state, is_leaf=_is_var)


def batch_spec(shape: Sequence[int], mesh: Mesh) -> P:
    """First axis over ``data`` x ``fsdp`` where it divides (else over what does), rest
    replicated; scalars replicated."""
    if not len(shape):
        return P()
    return logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh)


def batch_sharding(x, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(np.shape(x), mesh))


# ----------------------------------------------------------------------------- activations
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("emit_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules=None):
    """Within this context, :func:`constrain` places activations on ``mesh`` by ``rules``."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Any] | None:
    """``(mesh, rules)`` of the enclosing :func:`use_mesh`, or None (for kernels that must
    run per shard under ``shard_map``)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` by logical ``axes`` under :func:`use_mesh`;
    unchanged otherwise (single-device code paths pay nothing)."""
    cur = _ACTIVE.get()
    if cur is None:
        return x
    mesh, rules = cur
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(tuple(axes), x.shape, mesh, rules)))


def constrain_hidden(x: jax.Array) -> jax.Array:
    """``[B, T, D]`` activations between blocks: batch over data x fsdp, the rest replicated."""
    return constrain(x, ("batch", "act_seq", "act_embed"))


__all__ = ["MESH_AXES", "BATCH_AXES", "DEFAULT_RULES", "parse_mesh", "mesh_shape", "make_mesh",
           "SAMPLER_MESHES", "sampler_mesh",
           "logical_to_spec", "state_shardings", "batch_spec", "batch_sharding", "use_mesh",
           "active_mesh", "constrain", "constrain_hidden"]
