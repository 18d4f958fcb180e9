"""Gradient accumulation: one optimizer step over a batch taken in M micro-batches.

The paper trains with micro-batch 4 and gradient accumulation 2 on 8 GPUs; the activations of a
whole 10,240-token step do not fit an 80 GB card. A step with ``M`` micro-batches runs as one
jitted program: the host splits the collated batch into ``M`` row blocks (:func:`split_rows`),
and :func:`accumulate` scans over them, keeping one micro-batch's activations at a time and
summing the float32 gradients. Every loss is normalised by its *global* denominator (all label
tokens of the step for SFT; the GRPO aggregation's, ``emit_jax.rl.grpo.global_denominator``), so
the sum over micro-batches is the one-shot loss and its gradient the one-shot gradient (tested to
1e-6).

Exact for every loss that decomposes over rows. A layer that couples rows in training mode, the
heat-map BatchNorm with batch statistics (stage 1; stage 2 with ``grpo.bn='train'``), normalises
each micro-batch with its own statistics and updates its running statistics once per
micro-batch, as PyTorch does with the authors' gradient accumulation.

Layout of a split batch: every row-, tile- or CE-indexed array ``[N, ...]`` becomes
``[N / M (padded), M, ...]``: the first axis stays the one sharded over ``data`` x ``fsdp``
(``emit_jax.parallel.batch_spec``), so each device keeps the same rows; per-micro-batch counts
(``num_ce``) become ``[M]`` vectors. :func:`accumulate` moves ``M`` to the front and scans.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# the arrays indexed by row (first axis = batch rows); tiles and CE pairs are split by the rows
# they belong to
ROW_KEYS = ("input_ids", "labels", "attention_mask", "comp_tokens", "comp_mask", "adv", "ref",
            "old", "use_comp", "row_tiles")
PER_MICRO = ("num_ce",)  # one value per micro-batch: [M]


def micro_count(batch_size: int, micro_batch_size: int, what: str = "batch_size") -> int:
    """How many micro-batches: ``batch_size / micro_batch_size`` (0 or >= batch_size: one)."""
    mb = int(micro_batch_size)
    if mb < 0:
        raise ValueError(f"micro_batch_size must be >= 0 (0 = the whole batch), got {mb}")
    if mb == 0 or mb >= batch_size:
        return 1
    if batch_size % mb:
        raise ValueError(f"micro_batch_size {mb} does not divide {what} {batch_size}")
    return batch_size // mb


def _blocks(counts: np.ndarray, m: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each micro-batch's items, when row ``i`` owns ``counts[i]`` items."""
    per = len(counts) // m
    ends = np.concatenate([[0], np.cumsum(counts)])
    return [(int(ends[k * per]), int(ends[(k + 1) * per])) for k in range(m)]


def _stack(pieces: list[np.ndarray], size: int) -> np.ndarray:
    """``M`` arrays ``[n_k, ...]`` -> ``[size, M, ...]``, each zero-padded to ``size`` items."""
    first = pieces[0]
    out = np.zeros((size, len(pieces)) + first.shape[1:], first.dtype)
    for k, p in enumerate(pieces):
        out[:len(p), k] = p
    return out


def split_rows(batch: Mapping[str, Any], m: int, *, tile_bucket: int = 1) -> dict[str, np.ndarray]:
    """A collated batch (``emit_jax.data.pipeline.collate`` plus any row-indexed extras of
    :data:`ROW_KEYS`) -> the same arrays as ``m`` micro-batches of consecutive rows, laid out
    ``[N / m, m, ...]`` (module docstring). Tiles follow their rows (``row_tiles``), CE pairs the
    rows that have one (``use_comp``), each block zero-padded to the largest block (tiles to a
    multiple of ``tile_bucket``) and to at least ``1/m`` of the batch's own padded stack (so a
    pipeline's fixed stack shapes give fixed block shapes); ``num_ce`` becomes the ``[m]`` real
    CE counts. Label positions
    (``label_pos`` / ``label_ids`` / ``label_mask``) are made per block with one common K."""
    from emit_jax.data.pipeline import label_positions

    B = len(batch["input_ids"])
    if m < 1 or B % m:
        raise ValueError(f"{m} micro-batches do not divide a batch of {B} rows")
    per = B // m
    out: dict[str, np.ndarray] = {}
    for k in ROW_KEYS:
        if k in batch:
            x = np.asarray(batch[k])
            out[k] = np.ascontiguousarray(x.reshape((m, per) + x.shape[1:]).swapaxes(0, 1))
    if "pixel_values" in batch:
        if "row_tiles" not in batch:
            raise ValueError("split_rows needs the batch's row_tiles (collate adds them)")
        pix = np.asarray(batch["pixel_values"])
        blocks = _blocks(np.asarray(batch["row_tiles"]), m)
        size = max(max(b - a for a, b in blocks), -(-len(pix) // m), 1)
        size = -(-size // tile_bucket) * tile_bucket
        out["pixel_values"] = _stack([pix[a:b] for a, b in blocks], size)
    if "ce_pixels" in batch:
        ce = np.asarray(batch["ce_pixels"])
        has = np.asarray(batch.get("use_comp", np.zeros(B, bool)), np.int64)
        n_ce = int(batch.get("num_ce", has.sum()))
        if has.sum() != n_ce:
            raise ValueError(f"use_comp marks {int(has.sum())} rows, num_ce is {n_ce}")
        blocks = _blocks(has, m)
        size = max(max(b - a for a, b in blocks), -(-len(ce) // m), 1)
        out["ce_pixels"] = _stack([ce[a:b] for a, b in blocks], size)
        out["num_ce"] = np.array([b - a for a, b in blocks], np.int32)
    if "labels" in batch:
        labels = np.asarray(batch["labels"])
        K = label_positions(labels)["label_pos"].shape[1]
        parts = [label_positions(labels[k * per:(k + 1) * per], min_k=K) for k in range(m)]
        for key in ("label_pos", "label_ids", "label_mask"):
            out[key] = np.stack([p[key] for p in parts], axis=1)
    return out


def _fresh(state):
    """``state`` with new Variable objects (same arrays) created at the current trace level."""
    return jax.tree.map(lambda x: x, state)


def to_scan(micro: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Inside the step: ``[N / M, M, ...]`` -> ``[M, N / M, ...]`` (per-micro ``[M]`` as is)."""
    return {k: (v if k in PER_MICRO else jnp.moveaxis(v, 1, 0)) for k, v in micro.items()}


def accumulate(model, wrt, micro: Mapping[str, jax.Array],
               loss_fn: Callable[[Any, dict], tuple[jax.Array, Any]]):
    """Sum ``loss_fn(model, micro_batch) -> (loss_k, aux_k)`` and its gradient with respect to
    the parameters of ``model`` matching ``wrt`` over the micro-batches of ``micro`` (the
    :func:`split_rows` layout), one at a time (``lax.scan``). Variables that are not parameters
    (BatchNorm statistics, RNG counters) carry from one micro-batch to the next and are written
    back into ``model``. Returns ``(loss, aux [M, ...], grads)``; ``grads`` is an ``nnx.State``
    like ``nnx.grad`` with ``DiffState(0, wrt)`` gives, accumulated in the parameters' dtype
    (float32 for trained parameters, ``emit_jax.training.precision``)."""
    graphdef, params, mutable, frozen = nnx.split(model, wrt, nnx.Not(nnx.Param), ...)
    xs = to_scan(micro)

    def body(carry, mb):
        gsum, mut = carry

        def f(p):
            # fresh Variables at this trace level: BatchNorm updates its statistics in here, and
            # nnx's lifted transforms inside (remat) write back into every Variable they see
            m = nnx.merge(graphdef, *(_fresh(t) for t in (p, mut, frozen)))
            loss, aux = loss_fn(m, mb)
            return loss, (aux, nnx.state(m, nnx.Not(nnx.Param)))

        (loss, (aux, mut)), g = jax.value_and_grad(f, has_aux=True)(params)
        return (jax.tree.map(jnp.add, gsum, g), mut), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, mutable), (losses, aux) = jax.lax.scan(body, (zeros, mutable), xs)
    nnx.update(model, mutable)
    return jnp.sum(losses), aux, grads


def scan_apply(nodes: tuple, fn: Callable[..., Any], micro: Mapping[str, jax.Array]):
    """``fn(*nodes, micro_batch)`` over the micro-batches of ``micro``, one at a time, without
    gradients (the reference pass of GRPO). Non-parameter variables carry from one micro-batch to
    the next and are written back. Returns the outputs in the split layout ``[N / M, M, ...]``."""
    graphdef, mutable, rest = nnx.split(nodes, nnx.Not(nnx.Param), ...)

    def body(mut, mb):
        ns = nnx.merge(graphdef, _fresh(mut), _fresh(rest))
        out = fn(*ns, mb)
        return nnx.state(ns, nnx.Not(nnx.Param)), out

    mutable, outs = jax.lax.scan(body, mutable, to_scan(micro))
    nnx.update(nodes, mutable)
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), outs)


def rows(x: jax.Array) -> jax.Array:
    """A split-layout array ``[N / M, M, ...]`` -> ``[N, ...]`` in the batch's row order."""
    return jnp.moveaxis(x, 1, 0).reshape((-1,) + x.shape[2:])
