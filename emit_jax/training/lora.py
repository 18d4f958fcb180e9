"""LoRA for stage 2 (and the ``sft2`` ablation): qwix adapters on the targeted linears, the
trainable set (LoRA factors + the modules trained in full), and merging back into plain kernels
(:func:`merge_lora` for the final model; :func:`merged_model`, on the devices, for the sampler).

With stacked layers (``scan_layers``) the factors of the layers' linears are stacked too
(:func:`stacked_adapters`); plain LoRA only: QLoRA's quantized kernels are made by qwix inside
the layer's first run, which under ``lax.scan`` is a per-layer copy (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from emit_jax.data.pipeline import batch_ce
from emit_jax.errors import ConfigError
from emit_jax.models import memory, scan
from emit_jax.models.layers import axes_meta
from emit_jax.parallel import localize_module, placed_module
from emit_jax.training.config import LoRAConfig, check_lora_rank
from emit_jax.training.precision import float32_initializer
from emit_jax.models.emit import is_emit

#: modules stage 2 trains in full (no adapters): the soft prompt, the heat-map projector, mlp1
TRAINED_IN_FULL = ("soft_prompt", "projector", "multi_modal_projector")
#: the model method qwix intercepts to apply the adapters (see apply_lora)
LORA_METHODS = ("forward",)
#: the factors' initializers: qwix's defaults (He-uniform A, zero B), drawn in float32
LORA_A_INIT = float32_initializer(jax.nn.initializers.he_uniform())
LORA_B_INIT = float32_initializer(jax.nn.initializers.zeros)


def lora_provider(cfg: LoRAConfig):
    """qwix's LoRA rule for ``cfg``. The factors are created in float32 whatever the base
    kernels' dtype (``emit_jax.training.precision``)."""
    import qwix  # noqa: PLC0415 - qwix only where adapters are made

    return qwix.LoraProvider(module_path=cfg.targets, rank=int(cfg.rank), alpha=float(cfg.alpha),
                             dropout=float(cfg.dropout), lora_a_initializer=LORA_A_INIT,
                             lora_b_initializer=LORA_B_INIT,
                             **({"weight_qtype": cfg.weight_qtype} if cfg.weight_qtype else {}))


def stacked_adapters(model, cfg: LoRAConfig, rngs: nnx.Rngs) -> None:
    """Give every targeted linear of ``model``'s stacked layers (kernel ``[L, in, out]``) its
    factors ``kernel_lora_a [L, in, r]`` and ``kernel_lora_b [L, r, out]``, in place: qwix's
    names, initializers (one draw per layer) and logical axes, ``"layers"`` first.

    qwix creates a factor in the module that first runs the matmul; under ``lax.scan`` that is
    a per-layer copy inside the trace, where nothing it creates stays. Made beforehand, the
    factors are found there, one layer's slice per scan step, and act as on unrolled layers."""
    if cfg.weight_qtype:
        raise ConfigError(f"config grpo.lora.weight_qtype: {cfg.weight_qtype!r} (QLoRA) does not "
                          "work with kernels.scan_layers=True (qwix quantizes the kernels inside "
                          "each layer's first run, a per-layer copy under lax.scan); use "
                          "weight_qtype='' or scan_layers=False")
    r = int(cfg.rank)
    for path, module in nnx.iter_modules(model):
        if not (isinstance(module, nnx.Linear) and scan.is_stacked(path + ("kernel",))
                and re.fullmatch(cfg.targets, "/".join(map(str, path)))):
            continue
        n, d_in, d_out = module.kernel.shape
        layers, ax_in, ax_out = module.kernel.get_metadata()["out_sharding"]
        keys = jax.random.split(rngs.params(), n)
        module.kernel_lora_a = nnx.LoRAParam(jax.vmap(lambda k: LORA_A_INIT(k, (d_in, r)))(keys),
                                             **axes_meta((layers, ax_in, None)))
        module.kernel_lora_b = nnx.LoRAParam(jax.vmap(lambda k: LORA_B_INIT(k, (r, d_out)))(keys),
                                             **axes_meta((layers, None, ax_out)))


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


def adapted_kernels(policy) -> dict[str, jax.Array]:
    """``{key: kernel}`` of every kernel of ``policy`` with LoRA factors (``key``:
    ``"/".join`` of its path; the factors are at ``key + "_lora_a"`` / ``"_lora_b"``)."""
    _, factors, rest = nnx.split(policy, nnx.LoRAParam, ...)
    return _kernels_of(_keyed(factors), _keyed(rest))


def _keyed(state) -> dict[str, jax.Array]:
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def _kernels_of(factors: dict, rest: dict) -> dict:
    a = "_lora_a"
    return {k[:-len(a)]: rest[k[:-len(a)]] for k in factors
            if k.endswith(a) and k[:-len(a)] in rest}


def lora_update(values: dict) -> dict:
    """``{key: kernel [in, out], key_lora_a: A [in, r], key_lora_b: B [r, out], "scale": s}``
    -> ``{key: kernel + A @ B * s}``, computed in float32 and cast to the kernel's dtype."""
    kernels = [k[:-len("_lora_a")] for k in values if k.endswith("_lora_a")]
    return {k: _plus_update(values[k], values[k + "_lora_a"], values[k + "_lora_b"],
                            values["scale"]) for k in kernels}


def _plus_update(w, a, b, s):
    f32 = jnp.float32
    return (w.astype(f32) + (a.astype(f32) @ b.astype(f32)) * s).astype(w.dtype)


def merged_model(policy, reference, mesh=None):
    """:func:`merge_lora`'s model (not for QLoRA), made on the devices by one jitted program
    (``emit_jax.parallel.placed_module``): the adapted kernels plus ``A @ B * alpha / rank``,
    the rest the policy's values; with ``mesh``, every array placed on it by its logical axes in
    the same program. Only merged or moved arrays are new, the others are the policy's, which
    stays as it is: the rollout samples from this copy and drops it after the step."""
    _, factors, rest = nnx.split(policy, nnx.LoRAParam, ...)
    factors = _keyed(factors)
    inputs = {**_kernels_of(factors, _keyed(rest)), **factors,
              "scale": jnp.float32(_lora_scale(policy))}
    return placed_module(nnx.graphdef(reference), rest, mesh, compute=lora_update, inputs=inputs)


def check_rank(model, cfg: LoRAConfig) -> None:
    """Raise ``ConfigError`` when ``cfg.rank`` is above ``min(in, out)`` of every linear layer
    ``cfg.targets`` matches in ``model``: no layer can use that rank (a kernel ``[in, out]``
    changes in at most ``min(in, out)`` directions), and its factors (``rank x (in + out)``
    per layer) outweigh the layer. Before, ``rank=100000`` on a 128-wide model ran its first
    GRPO step for minutes without a word."""
    widths = {}
    for path, module in nnx.iter_modules(model):
        name = "/".join(map(str, path))
        if isinstance(module, nnx.Linear) and re.fullmatch(cfg.targets, name):
            d_in, d_out = module.kernel.shape[-2:]
            widths[name] = (int(d_in), int(d_out))
    check_lora_rank(cfg.rank, widths)  # (none matched: apply_lora names the targets)


def apply_lora(model, sample: dict, lora_cfg: LoRAConfig, *, seed: int = 0):
    """The LoRA policy over ``model`` (which stays the reference: its modules are shared, not
    copied), traced once on the collated ``sample`` batch.

    qwix applies the adapters inside the one method it intercepts (``__call__`` by default).
    Every training and sampling path calls ``model.forward`` (``__call__`` calls it too), so
    that is the method intercepted: with the default, the loss, the reference-free log-probs and
    the sampler all ran without the adapters, and LoRA received no gradient."""
    import qwix  # noqa: PLC0415

    check_rank(model, lora_cfg)
    model.eval()
    localize_module(model)  # qwix traces eagerly: per process, not over a multi-process mesh
    ce, _ = batch_ce(sample)
    kw = {"ce_pixels": ce} if is_emit(model) else {}
    rngs = nnx.Rngs(seed)
    if getattr(model, "mllm", model).config.scan_layers:
        model = nnx.clone(model)  # the factors go on the policy only (the arrays are shared)
        stacked_adapters(model, lora_cfg, rngs)
    # the trace that creates the factors runs the ViT unchunked: under memory.vit_chunk its
    # tiles run in lax.map over a merged copy of the ViT, where qwix made its factors on the
    # copy (lost) or found no rngs (a traceback at GRPO's first step; aot compiled without them)
    unchunked = {**dataclasses.asdict(memory.current()), "vit_chunk": 0}
    with memory.memory_options(**unchunked):
        policy = qwix.apply_lora_to_model(model, lora_provider(lora_cfg),
                                          jnp.asarray(sample["input_ids"]),
                                          jnp.asarray(sample["pixel_values"]),
                                          jnp.asarray(sample["attention_mask"]), rngs=rngs,
                                          methods=LORA_METHODS, **kw)
    if not nnx.to_flat_state(nnx.state(policy, nnx.LoRAParam)):
        # no adapter: the stage would silently train only the modules trained in full
        linears = ["/".join(map(str, p)) for p, m in nnx.iter_modules(model)
                   if isinstance(m, nnx.Linear)]
        raise ConfigError(f"config grpo.lora.targets: {lora_cfg.targets!r} matches none of the "
                          f"model's {len(linears)} linear layers (their paths look like "
                          f"{linears[0]!r}), so LoRA would train nothing"
                          if linears else f"config grpo.lora.targets: {lora_cfg.targets!r}: the "
                          "model has no linear layers to adapt")
    policy._emit_lora_scale = lora_cfg.scale
    return policy
