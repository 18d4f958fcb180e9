"""Global batches from host data, in one process or several.

With one process a batch is a ``device_put`` on its sharding. With several (after
``emit_jax.parallel.distributed.initialize``, ``jax.devices()`` is global) every process runs the
same program on its share of the batch: a process loads only the rows its devices hold
(:func:`process_rows`) and :func:`assemble_batch` makes the global arrays from every process's
own rows, or, where the batch is not split by process, every process passes the same full batch
(:func:`global_batch`). Batches are split over ``data`` x ``fsdp`` along their first axis
(``emit_jax.parallel.mesh.batch_spec``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from emit_jax.parallel.mesh import BATCH_AXES, batch_spec


def global_batch(x, sharding: NamedSharding):
    """A global ``jax.Array`` of host data: in one process a ``device_put``; with several
    processes each passes the same full array and keeps the pieces its devices hold."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = global_batch(jax.random.key_data(x), sharding)  # typed PRNG keys: via their data
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def process_rows(n: int, mesh: Mesh) -> tuple[int, int] | None:
    """The rows ``[start, stop)`` of an ``n``-row batch that this process's devices hold under
    :func:`batch_spec`, when every process holds its own contiguous ``n / process_count`` rows
    (then each process can load just those); None when the batch is not split that way (one
    process, or a batch axis replicated across processes, e.g. a tensor axis spanning hosts)."""
    if jax.process_count() == 1:
        return None
    sharding = NamedSharding(mesh, batch_spec((n,), mesh))
    rows: set[int] = set()
    for idx in sharding.addressable_devices_indices_map((n,)).values():
        rows.update(range(*idx[0].indices(n)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start or len(rows) * jax.process_count() != n:
        return None
    return start, stop


def _pad_axis(x: np.ndarray, size: int, axis: int, value, left: bool = False) -> np.ndarray:
    extra = size - x.shape[axis]
    if extra <= 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (extra, 0) if left else (0, extra)
    return np.pad(x, widths, constant_values=value)


def assemble_batch(local: Mapping[str, Any], mesh: Mesh, *, pad_id: int = 0,
                   ignore: int = -100, pad_side: str = "right") -> dict[str, jax.Array]:
    """Global arrays from every process's own collated rows (a collective: call it on every
    process with its batch from ``emit_jax.data.pipeline.collate``, plus ``label_positions``).

    Shapes are agreed first (one small all-gather): token arrays ``[b, L]`` are padded to the
    longest ``L`` of any process (on ``pad_side``; label positions shift with left padding), the
    label arrays to the largest ``K``, and the tile stack ``pixel_values [N, ...]`` and the CE
    stack ``ce_pixels [M, ...]`` to the largest count, a multiple of the process's batch shards.
    Each process's block keeps its padding after its real rows, so the global stacks have padding
    between real rows: ``tile_valid [P*N]`` and ``num_ce`` (now a bool mask ``[P*M]``) mark them,
    and the model takes the real rows in order (``emit_jax.models.internvl.valid_first``).
    """
    from jax.experimental import multihost_utils

    nproc = jax.process_count()
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES) // nproc  # batch shards per process
    ids = np.asarray(local["input_ids"])
    n_tiles, n_ce = int(local.get("num_tiles", 0)), int(local.get("num_ce", 0))
    sizes = np.array([ids.shape[1], np.shape(local.get("label_pos", np.zeros((0, 0))))[1],
                      len(local.get("pixel_values", ())), len(local.get("ce_pixels", ())),
                      n_tiles], np.int64)
    seq, k, tiles, ces, any_tiles = np.asarray(
        multihost_utils.process_allgather(sizes)).reshape(nproc, -1).max(0)
    round_up = lambda v: max(shards, -(-int(v) // shards) * shards)  # noqa: E731
    left = pad_side == "left"
    host: dict[str, np.ndarray] = {
        "input_ids": _pad_axis(ids, seq, 1, pad_id, left),
        "attention_mask": _pad_axis(np.asarray(local["attention_mask"]), seq, 1, 0, left)}
    if "labels" in local:
        host["labels"] = _pad_axis(np.asarray(local["labels"]), seq, 1, ignore, left)
    if "label_pos" in local:
        pos = np.asarray(local["label_pos"]) + (seq - ids.shape[1] if left else 0)
        host["label_pos"] = _pad_axis(pos, k, 1, 0)
        host["label_ids"] = _pad_axis(np.asarray(local["label_ids"]), k, 1, 0)
        host["label_mask"] = _pad_axis(np.asarray(local["label_mask"]), k, 1, False)
    if any_tiles:
        host["pixel_values"] = _pad_axis(np.asarray(local["pixel_values"]), round_up(tiles), 0, 0)
        host["tile_valid"] = np.arange(round_up(tiles)) < n_tiles
    if "ce_pixels" in local:
        host["ce_pixels"] = _pad_axis(np.asarray(local["ce_pixels"]), round_up(ces), 0, 0)
        host["num_ce"] = np.arange(round_up(ces)) < n_ce
    out = {}
    for key, x in host.items():
        shape = (nproc * x.shape[0],) + x.shape[1:]
        out[key] = jax.make_array_from_process_local_data(
            NamedSharding(mesh, batch_spec(shape, mesh)), x, shape)
    return out


__all__ = ["global_batch", "process_rows", "assemble_batch"]
