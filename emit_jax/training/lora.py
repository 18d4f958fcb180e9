"""LoRA for stage 2 (and the ``sft2`` ablation): qwix adapters on the targeted linears, the
trainable set (LoRA factors + the modules trained in full), and merging back into plain kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emit_jax.data.pipeline import batch_ce
from emit_jax.parallel import localize_module
from emit_jax.training.config import LoRAConfig
from emit_jax.training.precision import float32_initializer
from emit_jax.models.emit import is_emit

#: modules stage 2 trains in full (no adapters): the soft prompt, the heat-map projector, mlp1
TRAINED_IN_FULL = ("soft_prompt", "projector", "multi_modal_projector")
#: the model method qwix intercepts to apply the adapters (see apply_lora)
LORA_METHODS = ("forward",)


def lora_provider(cfg: LoRAConfig):
    """qwix's LoRA rule for ``cfg``. The factors are created in float32 whatever the base
    kernels' dtype (qwix's default initializers, He-uniform A and zero B, drawn in float32;
    ``emit_jax.training.precision``)."""
    import qwix  # noqa: PLC0415 - qwix only where adapters are made

    return qwix.LoraProvider(module_path=cfg.targets, rank=int(cfg.rank), alpha=float(cfg.alpha),
                             dropout=float(cfg.dropout),
                             lora_a_initializer=float32_initializer(jax.nn.initializers.he_uniform()),
                             lora_b_initializer=float32_initializer(jax.nn.initializers.zeros),
                             **({"weight_qtype": cfg.weight_qtype} if cfg.weight_qtype else {}))


def trainable_filter():
    full = nnx.Any(*[nnx.PathContains(n) for n in TRAINED_IN_FULL])
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, full))


def merge_lora(policy, reference):
    """A plain model (``reference``'s structure) whose kernels include the LoRA updates
    ``kernel + A @ B * alpha / rank`` and whose fully trained modules hold the policy's values.
    With QLoRA the update is added to the reference's full-precision kernel."""
    pstate = dict(nnx.to_flat_state(nnx.state(policy)))
    merged = nnx.clone(reference)
    mstate = nnx.state(merged)
    flat = dict(nnx.to_flat_state(mstate))
    for path, var in flat.items():
        a = pstate.get(path[:-1] + (path[-1] + "_lora_a",))
        b = pstate.get(path[:-1] + (path[-1] + "_lora_b",))
        if path in pstate:
            value = pstate[path].get_value()
        elif a is not None:  # QLoRA: the policy holds a quantized copy; merge into the original
            value = var.get_value()
        else:
            continue
        if a is not None and b is not None:
            scale = a.get_metadata().get("lora_scale") or _lora_scale(policy)
            value = (value + (a.get_value() @ b.get_value()) * scale).astype(value.dtype)
        var.set_value(value)
    nnx.update(merged, mstate)
    return merged


def _lora_scale(policy) -> float:
    return float(getattr(policy, "_emit_lora_scale", 1.0))


def apply_lora(model, sample: dict, lora_cfg: LoRAConfig, *, seed: int = 0):
    """The LoRA policy over ``model`` (which stays the reference: its modules are shared, not
    copied), traced once on the collated ``sample`` batch.

    qwix applies the adapters inside the one method it intercepts (``__call__`` by default).
    Every training and sampling path calls ``model.forward`` (``__call__`` calls it too), so
    that is the method intercepted: with the default, the loss, the reference-free log-probs and
    the sampler all ran without the adapters, and LoRA received no gradient."""
    import qwix  # noqa: PLC0415

    model.eval()
    localize_module(model)  # qwix traces eagerly: per process, not over a multi-process mesh
    ce, _ = batch_ce(sample)
    kw = {"ce_pixels": ce} if is_emit(model) else {}
    policy = qwix.apply_lora_to_model(model, lora_provider(lora_cfg),
                                      jnp.asarray(sample["input_ids"]),
                                      jnp.asarray(sample["pixel_values"]),
                                      jnp.asarray(sample["attention_mask"]), rngs=nnx.Rngs(seed),
                                      methods=LORA_METHODS, **kw)
    policy._emit_lora_scale = lora_cfg.scale
    return policy
