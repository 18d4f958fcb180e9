"""Placing modules on a mesh and jitting steps over it with explicit shardings.

:func:`shard_module` places every array of a Module / Optimizer by its logical axes
(``emit_jax.parallel.mesh.state_shardings``); :func:`placed_module` makes a placed (and partly
recomputed) copy, leaving the original as it is. :class:`sharded_jit` jits the train step, the
sampler and the reference log-probs with explicit input and output shardings: graph-node
arguments by their logical axes, array arguments split over ``data`` x ``fsdp`` along their first
axis, traced under ``use_mesh`` so the activation constraints apply; :meth:`sharded_jit.lower`
gives the same program lowered on abstract inputs (``python -m emit_jax.aot``). Host arrays
become global ones through ``emit_jax.parallel.batch.global_batch``, so the same code runs in
one process or several.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emit_jax.parallel.batch import global_batch
from emit_jax.parallel.mesh import batch_sharding, state_shardings, use_mesh


# ---------------------------------------------------------------------------------- placing
def shard_module(node, mesh: Mesh, rules=None):
    """Place every array of ``node`` (a Module, an Optimizer, or a tuple of them) by its
    logical axes; in place. Returns ``node``."""
    state = nnx.state(node)
    sh = state_shardings(state, mesh, rules)
    nnx.update(node, _place_tree(state, sh))
    return node


def _place_tree(tree, shardings):
    """:func:`_place` over a tree; an array that several Variables hold (a LoRA policy and its
    reference share their base weights) is placed once and stays shared."""
    placed: dict = {}

    def one(a, s):
        key = (id(a), s)
        if key not in placed:
            placed[key] = (a, _place(a, s))  # keep ``a`` alive so its id is not reused
        return placed[key][1]
    return jax.tree.map(one, tree, shardings)


def _place(a, s: NamedSharding):
    """``a`` on sharding ``s``: unchanged when already there; a process-local array (every
    process holding the same full value) becomes a global one; a global array is resharded."""
    if _placed(a, s):
        return a
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return jax.device_put(a, s)
    return global_batch(a, s)


def _placed(a, s) -> bool:
    return isinstance(a, jax.Array) and a.sharding == s


def placed_module(graphdef, state, mesh: Mesh | None = None, rules=None, *,
                  compute: Callable | None = None, inputs: dict | None = None):
    """A new module ``nnx.merge(graphdef, state)`` with its arrays on ``mesh`` by their logical
    axes and the arrays ``compute`` returns replaced, all made by one jitted program (a
    collective in a multi-process run; each new array is written once, on its target
    sharding). ``compute(inputs) -> {key: array}`` (a module-level function: the program is
    cached by it) maps keys ``"/".join(map(str, path))`` of ``state``'s paths to new values.
    Arrays that neither change nor move are shared with ``state``, whose Variables stay as
    they are; without a mesh nothing moves."""
    flat = {"/".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(state)}
    inputs = inputs or {}
    changed = set(jax.eval_shape(compute, inputs)) if compute else set()
    target = {}
    if mesh is not None:
        sh = dict(nnx.to_flat_state(state_shardings(state, mesh, rules)))
        target = {k: sh[p].get_value() for k, (p, _) in flat.items()}
    moving = {k: v.get_value() for k, (_, v) in flat.items()
              if k not in changed and k in target and not _placed(v.get_value(), target[k])}
    out_sh = tuple(sorted((k, target[k]) for k in changed | set(moving))) if target else ()
    new = _placed_program(compute, out_sh, inputs, moving)
    return nnx.merge(graphdef, nnx.from_flat_state(
        [(p, v.replace(new[k] if k in new else v.get_value())) for k, (p, v) in flat.items()]))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _placed_program(compute, shardings, inputs, moving):
    """:func:`placed_module`'s program: ``compute(inputs)`` and ``moving`` (``{key: array}``),
    each output on its sharding of ``shardings`` (``((key, NamedSharding), ...)``; () keeps
    XLA's choice)."""
    out = {**(compute(inputs) if compute else {}), **moving}
    return {k: jax.lax.with_sharding_constraint(out[k], s) for k, s in shardings} \
        if shardings else out


# ------------------------------------------------------------------------------ sharded jit
def _is_node(x) -> bool:
    return isinstance(x, (nnx.Module, nnx.Optimizer)) or (
        hasattr(nnx, "Pytree") and isinstance(x, nnx.Pytree) and not isinstance(x, nnx.Variable))


class sharded_jit:  # noqa: N801 - used like a decorator / function
    """``fn(*args)`` jitted over a mesh with explicit shardings.

    Graph-node arguments (Modules, Optimizers) are split into their state with the shardings of
    :func:`state_shardings`. The ``mutable`` part (an nnx filter; default everything) comes back
    out with the same shardings and is written into the nodes afterwards (so ``fn`` may update
    it, as an optimizer step does); the rest is input only, so frozen weights are neither copied
    nor returned (a LoRA policy and its reference keep sharing theirs). Array arguments are
    split along their first axis over ``data`` x ``fsdp`` (:func:`batch_spec`); other Python
    values are static. Outputs are replicated. Without a mesh this is ``nnx.jit``.
    :meth:`lower` gives the same program lowered on abstract inputs, without running it
    (``python -m emit_jax.aot`` compiles it for a TPU slice on a CPU host).
    """

    def __init__(self, fn: Callable, mesh: Mesh | None = None, rules=None, *, mutable=...):
        self.fn, self.mesh, self.rules = fn, mesh, rules
        self.mutable = mutable
        self._cache: dict = {}
        self._plain = nnx.jit(fn) if mesh is None else None

    def __call__(self, *args):
        if self.mesh is None:
            return self._plain(*args)
        jitted, nodes, (state, frozen), dyn, (st_sh, fr_sh, dyn_sh) = self._program(args)
        with use_mesh(self.mesh, self.rules):
            placed = _place_tree((state, frozen), (st_sh, fr_sh))
            dyn = tuple(jax.tree.map(_place, d, s) for d, s in zip(dyn, dyn_sh))
            new_state, out = jitted(*placed, *dyn)
        nnx.update(nodes, placed[1], new_state)  # frozen: placed once, then reused as is
        return out

    def lower(self, *args) -> "jax.stages.Lowered":
        """The program ``self(*args)`` would run, lowered and not run: ``jax.jit(pure,
        in_shardings, out_shardings).lower(...)`` of exactly the function and shardings
        :meth:`__call__` uses, on abstract inputs (:meth:`abstract_args`). Nothing is placed or
        executed, so the mesh may be laid over abstract devices (``jax.experimental.
        topologies``: a TPU slice compiled on a CPU host) and the nodes may be abstract
        (``nnx.eval_shape``). ``.compile()`` of the result gives ``memory_analysis()``,
        ``cost_analysis()`` and ``input_shardings``. Traced under :func:`use_mesh`, so the
        activation constraints are those of a real call."""
        if self.mesh is None:
            raise ValueError("sharded_jit.lower needs a mesh (without one it is nnx.jit)")
        jitted = self._program(args)[0]
        with use_mesh(self.mesh, self.rules):
            return jitted.lower(*self.abstract_args(*args))

    def abstract_args(self, *args) -> tuple:
        """The arguments of the program ``self(*args)`` runs, as ``jax.ShapeDtypeStruct`` on
        their shardings: ``(mutable state, frozen state, *arrays)``. The two states are
        ``nnx.State`` trees of ``nnx.split`` of the graph-node arguments taken together (paths
        start with the node's index among them); the arrays are the array arguments in order
        (which may be ``ShapeDtypeStruct`` already; the batch is split over data x fsdp).
        Leaves come in the order of the lowered program's ``args_info``."""
        _, _, (state, frozen), dyn, (st_sh, fr_sh, dyn_sh) = self._program(args)
        return (jax.tree.map(_abstract, state, st_sh), jax.tree.map(_abstract, frozen, fr_sh),
                *(jax.tree.map(_abstract, d, s) for d, s in zip(dyn, dyn_sh)))

    def _program(self, args):
        """``(jitted, nodes, (state, frozen), arrays, (state, frozen, array shardings))`` for a
        call on ``args``; the jitted function is cached by the arguments' structure."""
        node_idx = [i for i, a in enumerate(args) if _is_node(a)]
        nodes = tuple(args[i] for i in node_idx)
        graphdef, state, frozen = nnx.split(nodes, self.mutable, ...)
        dyn_idx = [i for i, a in enumerate(args) if i not in node_idx and _is_arraylike(a)]
        static = tuple((i, args[i]) for i in range(len(args)) if i not in node_idx and i not in dyn_idx)
        dyn = tuple(args[i] for i in dyn_idx)
        st_sh = state_shardings(state, self.mesh, self.rules)
        fr_sh = state_shardings(frozen, self.mesh, self.rules)
        dyn_sh = tuple(jax.tree.map(lambda a: batch_sharding(a, self.mesh), d) for d in dyn)
        ckey = (graphdef, tuple(node_idx), tuple(dyn_idx), _static_key(static),
                tuple(jax.tree.structure(d) for d in dyn), jax.tree.structure(st_sh),
                jax.tree.structure(fr_sh),
                tuple(jax.tree.leaves(jax.tree.map(lambda s: s.spec, dyn_sh))))
        jitted = self._cache.get(ckey)
        if jitted is None:
            n, fn, mutable = len(args), self.fn, self.mutable

            def pure(state, frozen, *dyn_vals):
                ns = nnx.merge(graphdef, state, frozen)
                full: list = [None] * n
                for i, node in zip(node_idx, ns):
                    full[i] = node
                for i, v in zip(dyn_idx, dyn_vals):
                    full[i] = v
                for i, v in static:
                    full[i] = v
                out = fn(*full)
                return nnx.state(ns, mutable), out

            jitted = jax.jit(pure, in_shardings=(st_sh, fr_sh, *dyn_sh),
                             out_shardings=(st_sh, NamedSharding(self.mesh, P())))
            self._cache[ckey] = jitted
        return jitted, nodes, (state, frozen), dyn, (st_sh, fr_sh, dyn_sh)


def _abstract(x, sharding) -> jax.ShapeDtypeStruct:
    """``x`` (an array or a ``ShapeDtypeStruct``) as a ``ShapeDtypeStruct`` on ``sharding``."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


# what a sharded_jit takes as an array argument (ShapeDtypeStruct: sharded_jit.lower)
_ARRAYLIKE = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def _is_arraylike(a) -> bool:
    leaves = jax.tree.leaves(a)
    return bool(leaves) and all(isinstance(x, _ARRAYLIKE) for x in leaves)


def _static_key(static):
    out = []
    for i, v in static:
        try:
            hash(v)
            out.append((i, v))
        except TypeError:
            out.append((i, id(v)))
    return tuple(out)


__all__ = ["placed_module", "shard_module", "sharded_jit"]
