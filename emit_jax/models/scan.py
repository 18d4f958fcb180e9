"""Stacked layers run by ``jax.lax.scan`` (``InternVLConfig.scan_layers``, after MaxText's
``scan_layers``).

The L layers of the Qwen2 decoder or of the InternViT are one module whose every Variable has a
leading ``[L]`` axis, logical axis ``"layers"`` (replicated: ``emit_jax.parallel``'s rules map
it to no mesh axis). A forward traces one layer instead of L, so compile time stops growing with
depth; values equal the unrolled layers'.

Outside the model nothing changes: Hugging Face folders (``emit_jax.hf``), model checkpoints
(``emit_jax.checkpoint``) and training checkpoints (``emit_jax.training.state``) keep the
unrolled per-layer layout ``layers.<i>.<name>``, so either setting reads what the other wrote.
The helpers below rewrite at those boundaries: flat ``nnx`` paths (:func:`is_stacked`,
:func:`layer_path`) and nested pure dicts such as ``nnx.to_pure_dict`` of a model or an
optimizer (:func:`unstack_layers`, :func:`stack_layers`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from emit_jax.models import memory

LAYERS = "layers"


# ------------------------------------------------------------------------------ the modules
def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """``make(rngs)`` built ``n`` times as one module: every Variable ``[n, ...]`` (each layer
    its own random draw), ``"layers"`` prepended to its logical axes."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def build(r):
        return make(r)
    return build(rngs)


def run(layers: nnx.Module, body: Callable, carry, xs=None, *, start: int = 0,
        stop: int | None = None, remat: bool = False):
    """``jax.lax.scan`` of ``body(layer, carry, x) -> (carry, y)`` over layers ``start:stop`` of
    the stacked ``layers`` (``layer``: one layer as a module). ``xs``: per-layer inputs with a
    leading axis of ``stop - start``, or None. ``remat``: each step under ``jax.checkpoint``
    with ``memory.remat_policy``. Returns ``(carry, ys)``, ``ys`` stacked ``[stop - start, ...]``.

    Only parameters are scanned; other state (e.g. the ``nnx.Rngs`` qwix attaches while it
    creates adapters) is shared by every step, read-only."""
    graphdef, params, rest = nnx.split(layers, nnx.Param, ...)
    params = jax.tree.map(lambda a: a[start:stop], params)

    def step(c, inp):
        p, x = inp
        return body(nnx.merge(graphdef, p, rest), c, x)

    if remat:
        step = jax.checkpoint(step, policy=memory.current().checkpoint_policy(),
                              prevent_cse=False)
    return jax.lax.scan(step, carry, (params, xs))


# ------------------------------------------------------------------------------ flat paths
def is_stacked(path: tuple) -> bool:
    """Whether the flat path ``(..., "layers", name, ...)`` is a stacked Variable (an unrolled
    one has the layer index after ``"layers"``)."""
    if LAYERS not in path:
        return False
    j = path.index(LAYERS)
    return j + 1 < len(path) and not isinstance(path[j + 1], int)


def layer_path(path: tuple, i: int) -> tuple:
    """Stacked path -> layer ``i``'s unrolled path (``i`` inserted after ``"layers"``)."""
    j = path.index(LAYERS) + 1
    return path[:j] + (i,) + path[j:]


# ------------------------------------------------------------------------------ pure dicts
def _is_stacked_entry(v) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(k, str) for k in v)


def _is_unrolled_entry(v) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(k, int) for k in v)


def unstack_layers(tree: Any, take: Callable = lambda x, i: x[i]) -> Any:
    """Nested dict with stacked ``"layers"`` subtrees (names under them) -> the unrolled layout
    ``{"layers": {0: ..., L-1: ...}}``, layer ``i``'s leaves ``take(leaf, i)``. Anything else
    (an unrolled tree too) is returned as it is."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if k == LAYERS and _is_stacked_entry(v):
            n = jax.tree.leaves(v)[0].shape[0]
            out[k] = {i: jax.tree.map(lambda x, i=i: take(x, i), v) for i in range(n)}
        else:
            out[k] = unstack_layers(v, take)
    return out


_ALL = object()


def stack_layers(tree: Any, like: Any = _ALL) -> Any:
    """The inverse of :func:`unstack_layers`: each ``{"layers": {0: ..., L-1: ...}}`` becomes
    one subtree of ``jnp.stack([leaf_0, ..., leaf_L-1])``. With ``like`` (a tree in the stacked
    layout: arrays or ``ShapeDtypeStruct``) only the entries stacked there are stacked, each
    placed with ``like``'s sharding where it has one. Raises ``ValueError`` when the layer
    indices are not ``0..L-1`` or the layers' trees differ (from ``like``'s too)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        ref = _ALL if like is _ALL else (like.get(k) if isinstance(like, dict) else None)
        if k == LAYERS and _is_unrolled_entry(v) and (ref is _ALL or _is_stacked_entry(ref)):
            if sorted(v) != list(range(len(v))):
                raise ValueError(f"layers {sorted(v)} are not numbered 0..{len(v) - 1}")
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(v[i] for i in range(len(v))))
            out[k] = stacked if ref is _ALL else jax.tree.map(_placed, stacked, ref)
        else:
            out[k] = stack_layers(v, ref)
    return out


def _placed(x: jax.Array, ref) -> jax.Array:
    sharding = getattr(ref, "sharding", None)
    return jax.device_put(x, sharding) if isinstance(sharding, jax.sharding.Sharding) else x


def layer_struct(x: jax.ShapeDtypeStruct, i: int) -> jax.ShapeDtypeStruct:
    """``take`` for :func:`unstack_layers` of abstract arrays: one layer's shape, dtype and
    sharding (a ``NamedSharding`` loses its first, ``"layers"``, entry)."""
    del i
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh,
                                              jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
