"""Mixed precision for training: frozen weights in the configured dtype, trained ones in float32.

An 8B recipe stores its weights in bfloat16 (``param_dtype``) and computes in bfloat16
(``dtype``). Trained parameters must not be stored in bfloat16: its 8-bit mantissa rounds away
any AdamW step smaller than ~1/256 of the weight (at lr 1e-5 nothing above |w| ~ 0.004 moves at
all). So, as MaxText (``weight_dtype=float32`` with a bf16 ``dtype``) and flax's own
``param_dtype`` / ``dtype`` split do:

- every trained parameter is stored in float32 while its stage runs (:func:`promote_trainable`);
  the module keeps its compute ``dtype`` and casts the float32 value at use, so the forward and
  backward passes stay in bfloat16 and the gradient arrives in float32;
- the optimizer state follows the parameters (AdamW's moments in float32;
  ``training.sft.make_optimizer`` also asks optax for ``mu_dtype=float32``);
- LoRA factors are created in float32 through qwix's own rule options (the initializers of
  ``LoraRule``; :func:`float32_initializer`), and :class:`emit_jax.models.layers.Linear` casts
  the adapted layer's output back to the compute dtype;
- frozen weights stay as they are (bfloat16: half the memory);
- at the end of a stage the promoted parameters go back to the dtype they were stored in
  (:func:`to_storage`), so the stage's model checkpoint and the HF export hold the dtypes the
  user asked for, and a later stage starts from the same values whether it continues in the same
  process or loads that checkpoint.

Which parameters were promoted is recorded on the Variable itself (metadata ``storage_dtype``),
so clones, LoRA merges and jitted updates keep the record.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

TRAIN_DTYPE = jnp.float32
_META = "storage_dtype"


def _floating(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def promote_trainable(model, wrt) -> int:
    """Store every floating Variable of ``model`` matching ``wrt`` (an nnx filter) narrower than
    float32 in float32, in place, recording its dtype for :func:`to_storage`. Returns how many
    were promoted (0 when everything trained is float32 already)."""
    n = 0
    for _, var in nnx.to_flat_state(nnx.state(model, wrt)):
        value = var.get_value()
        if not _floating(value) or jnp.finfo(value.dtype).bits >= 32:
            continue
        var.set_metadata(_META, jnp.dtype(value.dtype).name)
        var.set_value(value.astype(TRAIN_DTYPE))
        n += 1
    if n:
        nnx.update(model, nnx.state(model, wrt))
    return n


def to_storage(model) -> int:
    """Put every Variable :func:`promote_trainable` promoted back into its stored dtype (in
    place; the record is dropped). Returns how many were cast."""
    state = nnx.state(model)
    n = 0
    for _, var in nnx.to_flat_state(state):
        name = var.get_metadata().get(_META)
        if not name:
            continue
        var.set_value(var.get_value().astype(jnp.dtype(name)))
        var.del_metadata(_META)
        n += 1
    if n:
        nnx.update(model, state)
    return n


def float32_initializer(init):
    """``init(key, shape, dtype)`` that ignores ``dtype`` and draws in float32: qwix creates
    LoRA factors in the base kernel's dtype through these rule initializers."""
    def draw(key, shape, dtype=None):
        del dtype
        return init(key, shape, TRAIN_DTYPE)
    return draw


def dtypes_of(model, filt=nnx.Param) -> dict[str, int]:
    """``{dtype name: number of arrays}`` of ``model``'s Variables matching ``filt`` (a report)."""
    out: dict[str, int] = {}
    for _, var in nnx.to_flat_state(nnx.state(model, filt)):
        value = var.get_value()
        if hasattr(value, "dtype"):
            k = jnp.dtype(value.dtype).name
            out[k] = out.get(k, 0) + 1
    return out


def is_float32(tree) -> bool:
    """Every floating leaf of ``tree`` is float32 (optimizer state checks)."""
    return all(x.dtype == TRAIN_DTYPE for x in jax.tree.leaves(tree) if _floating(x))
