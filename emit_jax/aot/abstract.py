"""The stage's model, LoRA policy and optimizer as the training code builds them, abstract
(``nnx.eval_shape``): nothing allocated."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

from emit_jax.errors import AotError
from emit_jax.plan.variables import model_config
from emit_jax.training.config import EMIT_STAGES, SFT_STAGES


@dataclasses.dataclass
class Abstract:
    """The stage's nodes, abstract (``nnx.eval_shape``), as the training code builds them."""
    model: Any  # the SFT stages' model; grpo: the reference (the stage-1 EMIT model)
    policy: Any  # sft2 / grpo: the LoRA policy (else the model)
    optimizer: Any
    wrt: Any  # the trainable filter
    shared: frozenset  # paths of reference arrays that are the policy's own arrays
    seconds: float


def model_setup(cfg, stage: str):
    """(InternVLConfig, EMITConfig or None) of ``cfg``'s ``stage``: ``emit_jax.plan``'s model
    config; EMIT's options from ``config.emit``, the heat map's strategy resolved as on a TPU
    (``auto`` picks the native CPU kernel on this host, which a TPU program cannot call)."""
    from emit_jax.models.emit import EMITConfig
    from emit_jax.ops import heatmap

    from emit_jax.training.stages import scan_layers

    emit = stage in EMIT_STAGES
    mcfg = model_config(cfg, emit).replace(scan_layers=scan_layers(cfg))  # as emit_jax.train
    if not emit:
        return mcfg, None
    fields = {f.name for f in dataclasses.fields(EMITConfig)}
    kw = {k: v for k, v in dict(cfg.get("emit") or {}).items() if k in fields}
    kw["ce_layers"] = tuple(kw["ce_layers"]) if kw.get("ce_layers") else None
    try:
        ecfg = EMITConfig(**kw, comp_token_id=mcfg.text.vocab_size - 1).validate()
    except (TypeError, ValueError) as e:
        raise AotError(f"config emit section: {e}") from None
    grid = mcfg.vision.grid
    if ecfg.heatmap_strategy == "auto":
        ecfg = dataclasses.replace(ecfg, heatmap_strategy=heatmap.choose_strategy(
            grid, grid, ecfg.window_for(grid)))
    return mcfg, ecfg


def _optim_config(cfg, stage: str):
    """The stage's optimiser settings, as ``emit_jax.train`` builds them."""
    from emit_jax.training.config import GRPOConfig, OptimConfig

    if stage == "grpo":
        return GRPOConfig.from_section(cfg.grpo).optim()
    return OptimConfig.from_section(cfg[stage], stage)


def _make_optimizer(model, ocfg, wrt):
    """The stage's optimizer as its training code builds it (``make_train_state``: trained
    parameters in float32)."""
    from emit_jax.training import optim

    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its log line
        return optim.make_train_state(model, ocfg, wrt)


def abstract_stage(cfg, stage: str, mcfg, ecfg, seed: int = 0) -> Abstract:
    """Model, LoRA policy and optimizer of ``stage`` inside one ``nnx.eval_shape``: shapes,
    dtypes and logical axes, nothing allocated. LoRA is qwix's own (``training.lora.apply_lora``)
    traced on a one-row sample; which arrays the policy shares with the reference is read off
    the trace (the same traced value in both)."""
    import numpy as np
    from flax import nnx

    from emit_jax.models.emit import EMIT
    from emit_jax.models.internvl import InternVL
    from emit_jax.training import lora
    from emit_jax.training.config import LoRAConfig
    from emit_jax.training.stages import stage1_trainable

    ocfg = _optim_config(cfg, stage)
    if stage in ("warmup", "base"):  # emit_jax.train
        wrt = nnx.Param if cfg[stage].get("train_vision", True) else \
            nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower")))
    elif stage == "sft":
        wrt = stage1_trainable()
    else:
        wrt = lora.trainable_filter()
    shared: set = set()

    def build():
        model = InternVL(mcfg, rngs=nnx.Rngs(seed))
        if ecfg is not None:
            model = EMIT(model, ecfg, rngs=nnx.Rngs(seed))
        policy = model
        if stage in ("sft2", "grpo"):  # LoRA traced on a one-row sample, as run_grpo applies it
            s = mcfg.vision.image_size
            sample = {"input_ids": np.zeros((1, 8), np.int32),
                      "attention_mask": np.ones((1, 8), np.int32),
                      "pixel_values": np.zeros((1, 3, s, s), np.float32),
                      "ce_pixels": np.zeros((1, 2, 3, s, s), np.float32),
                      "num_ce": np.int32(1 if ecfg is not None else 0)}
            policy = lora.apply_lora(model, sample, LoRAConfig.from_section(cfg.grpo.lora),
                                     seed=seed)
        if stage in SFT_STAGES:
            policy.train()  # run_sft
        optimizer = _make_optimizer(policy, ocfg, wrt)
        if policy is not model:
            ref_values = {id(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model))}
            shared.update(p for p, v in nnx.to_flat_state(nnx.state(policy))
                          if id(v.get_value()) in ref_values)
        return model, policy, optimizer

    t0 = time.time()
    model, policy, optimizer = nnx.eval_shape(build)
    return Abstract(model, policy, optimizer, wrt=wrt, shared=frozenset(shared),
                    seconds=time.time() - t0)
