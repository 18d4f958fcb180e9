"""Steps with a non-finite loss or gradient leave no trace.

Inside the jitted step: :func:`snapshot` the state the step may change (trainable parameters,
optimizer moments and counters, BatchNorm statistics) before the forward pass, and after the
update :func:`keep_if_finite` puts it back unless the loss and every gradient were finite. So a
bad step changes nothing (not even BatchNorm's running statistics or the optimizer's step count,
so the schedule does not advance) and a NaN can never reach a checkpoint.

On the host (:class:`NonFiniteCounter`) the policy is ``skip`` (count the step and go on; stop
after :data:`MAX_CONSECUTIVE` bad steps in a row, which means the run is diverging rather than
hitting one bad batch) or ``stop`` (stop at the first one, after saving the last good state).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

POLICIES = ("skip", "stop")
MAX_CONSECUTIVE = 5


class NonFiniteError(FloatingPointError):
    """Training stopped on non-finite numbers; the last good state is saved."""


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


class NonFiniteCounter:
    """Host-side bookkeeping of skipped steps for one stage."""

    def __init__(self, stage: str, policy: str = "skip", skipped: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"nonfinite must be one of {POLICIES}, got {policy!r}")
        self.stage, self.policy = stage, policy
        self.skipped, self.consecutive = int(skipped), 0

    def record(self, step: int, ok: bool) -> bool:
        """Count step ``step``; returns ``ok``. Raises :class:`NonFiniteError` when the policy
        says stop (the caller has not saved anything of this step: its state is unchanged)."""
        if ok:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.policy == "stop":
            raise NonFiniteError(f"{self.stage}: non-finite loss or gradient at step {step} "
                                 f"(nonfinite='stop'); the last good state is saved")
        if self.consecutive >= MAX_CONSECUTIVE:
            raise NonFiniteError(f"{self.stage}: {self.consecutive} steps in a row with a "
                                 f"non-finite loss or gradient (last: step {step}); stopping, the "
                                 f"last good state is saved")
        import sys

        print(f"warning: {self.stage}: step {step} skipped, non-finite loss or gradient "
              f"({self.skipped} skipped so far)", file=sys.stderr, flush=True)
        return False
