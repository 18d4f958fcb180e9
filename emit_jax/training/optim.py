"""The optimiser of every stage and the guarded update inside a jitted step.

:func:`make_optimizer`: AdamW with linear warm-up and cosine decay to 0, global-norm clipping;
:func:`make_train_state` stores the trained parameters in float32 first
(``emit_jax.training.precision``).

Non-finite steps leave no trace: inside the jitted step :func:`snapshot` the state the step may
change (trainable parameters, optimizer moments and counters, BatchNorm statistics) before the
forward pass; :func:`update_if_finite` applies the update and puts that state back unless the
loss and every gradient were finite. So a bad step changes nothing (not even BatchNorm's running
statistics or the optimizer's step count, so the schedule does not advance) and a NaN can never
reach a checkpoint. The host-side policy is ``emit_jax.training.loop.NonFiniteCounter``.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from emit_jax.training import precision
from emit_jax.training.config import OptimConfig


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay to 0, global-norm clipping. The first moment
    is kept in float32 (``mu_dtype``), the second follows the parameter, which is float32 for
    every trained parameter (``emit_jax.training.precision``)."""
    warm = max(0, int(round(cfg.warmup_ratio * cfg.steps)))
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warm, 1), max(cfg.steps, warm + 1), 0.0) \
        if warm else optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1))
    parts = [optax.clip_by_global_norm(cfg.clip_norm),
             optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay, mu_dtype=jnp.float32)]
    if cfg.llm_lr_scale != 1.0:
        parts.append(scale_under(LLM_PATH, cfg.llm_lr_scale))
    return optax.chain(*parts)


#: the path entry of the language model's parameters (``InternVL.language_model``)
LLM_PATH = "language_model"


def _named(entry) -> str | None:
    """A pytree path entry's name (a dict key or an attribute), else None."""
    name = getattr(entry, "key", getattr(entry, "name", None))
    return name if isinstance(name, str) else None


def scale_under(name: str, factor: float) -> optax.GradientTransformation:
    """Multiplies the updates of the leaves whose pytree path passes through ``name`` by
    ``factor`` (after AdamW: their learning rate and weight decay scaled), the others unchanged."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u * factor if any(_named(e) == name for e in path) else u,
            updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_train_state(model, ocfg: OptimConfig, wrt) -> nnx.Optimizer:
    """The optimizer of a stage that trains ``wrt`` of ``model``, after storing those parameters
    in float32 (``precision.promote_trainable``: a bf16 model keeps bf16 frozen weights and
    compute, with float32 master weights and AdamW state for what it trains)."""
    n = precision.promote_trainable(model, wrt)
    if n:
        print(f"[precision] {n} trained arrays stored in float32 (frozen weights and compute "
              f"keep their dtypes)", file=sys.stderr, flush=True)
    return nnx.Optimizer(model, make_optimizer(ocfg), wrt=wrt)


def all_finite(loss: jax.Array, grads) -> jax.Array:
    """Scalar bool: ``loss`` and every floating leaf of ``grads`` are finite."""
    leaves = [g for g in jax.tree.leaves(grads) if jnp.issubdtype(jnp.asarray(g).dtype, jnp.floating)]
    ok = jnp.all(jnp.isfinite(loss))
    for g in leaves:
        ok &= jnp.all(jnp.isfinite(g))
    return ok


def snapshot(nodes, filt) -> dict:
    """The arrays of ``nodes`` (a Module / Optimizer or a tuple of them) matching ``filt``."""
    return nnx.to_pure_dict(nnx.state(nodes, filt))


def _select(ok, new, old):
    if hasattr(new, "dtype") and jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
        data = jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
    return jnp.where(ok, new, old)


def keep_if_finite(nodes, filt, before: dict, ok: jax.Array) -> None:
    """Put ``before`` (a :func:`snapshot`) back into ``nodes`` where ``ok`` is False; in place."""
    state = nnx.state(nodes, filt)
    after = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, jax.tree.map(functools.partial(_select, ok), after, before))
    nnx.update(nodes, state)


def update_if_finite(model, optimizer, grads, loss, mutable, before: dict) -> jax.Array:
    """``optimizer.update(model, grads)``, then put ``before`` (the :func:`snapshot` of
    ``mutable`` taken ahead of the forward pass) back unless ``loss`` and ``grads`` are finite.
    Returns that scalar bool."""
    optimizer.update(model, grads)
    ok = all_finite(loss, grads)
    keep_if_finite((model, optimizer), mutable, before, ok)  # a bad step: no trace
    return ok
