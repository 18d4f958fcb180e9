"""The plan of one stage: its rows (component, phase, per-device and whole bytes) from the
abstract variables, the optimizer's state, and the activation terms; total = resident +
max(rollout, train)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

from emit_jax.plan.activations import _split, _Split, activation_terms
from emit_jax.plan.mesh import abstract_mesh, array_bytes
from emit_jax.plan.stage import Setup, _tiles, tiles_per_sequence
from emit_jax.plan.variables import (TRAIN_BITS, Var, _in_full, _master, abstract_variables,
                                     lora_factors, model_config, qlora_arrays, vocabulary)
from emit_jax.training.config import EMIT_STAGES, LORA_STAGES


@dataclasses.dataclass
class Row:
    name: str
    phase: str  # resident | rollout | train
    per_device: int
    whole: int
    note: str = ""


@dataclasses.dataclass
class StagePlan:
    setup: Setup
    rows: list
    info: dict

    def phase(self, name: str) -> int:
        return sum(r.per_device for r in self.rows if r.phase == name)

    @property
    def resident(self) -> int:
        return self.phase("resident")

    @property
    def rollout(self) -> int:
        return self.phase("rollout")

    @property
    def train(self) -> int:
        return self.phase("train")

    @property
    def total(self) -> int:
        return self.resident + max(self.rollout, self.train)

    def whole(self, name: str | None = None) -> int:
        return sum(r.whole for r in self.rows if name is None or r.phase == name)

    @property
    def whole_total(self) -> int:
        return self.whole("resident") + max(self.whole("rollout"), self.whole("train"))


@functools.lru_cache(maxsize=32)
def _optimizer_leaves(trainable: tuple) -> tuple:
    """``(shape, bits, Var or None)`` of every leaf of the project's AdamW state on
    ``trainable``, from ``jax.eval_shape(tx.init)`` (cached: what-ifs re-plan often)."""
    import jax
    import jax.numpy as jnp

    from emit_jax.training.config import OptimConfig
    from emit_jax.training.optim import make_optimizer

    dtypes = {8: jnp.int8, 16: jnp.bfloat16, 32: jnp.float32, 64: jnp.float64}
    params = {v.path: jax.ShapeDtypeStruct(v.shape, dtypes.get(v.bits, jnp.float32))
              for v in trainable}
    byname = {v.path: v for v in trainable}
    state = jax.eval_shape(make_optimizer(OptimConfig()).init, params)
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [getattr(k, "key", None) for k in kp]
        var = next((byname[k] for k in keys if isinstance(k, str) and k in byname), None)
        if var is not None and tuple(leaf.shape) != var.shape:
            var = None
        out.append((tuple(leaf.shape), jnp.dtype(leaf.dtype).itemsize * 8, var))
    return tuple(out)


def optimizer_bytes(trainable: Sequence[Var], mesh) -> tuple[int, int]:
    """(per device, whole) bytes of ``nnx.Optimizer(model, make_optimizer(...), wrt)``'s state
    on ``trainable``: AdamW's moments (each sharded like its parameter) and counters, + the
    optimizer's uint32 step."""
    per = whole = 4
    for shape, bits, var in _optimizer_leaves(tuple(trainable)):
        pd, wh = array_bytes(shape, bits, var.axes if var is not None else None, mesh)
        per, whole = per + pd, whole + wh
    return per, whole


def plan_stage(cfg, s: Setup, *, mcfg=None, variables=None) -> StagePlan:
    """The plan of one stage (``mcfg`` / ``variables`` override the config's model: tests)."""
    from emit_jax.training.lora import TRAINED_IN_FULL

    emit = s.stage in EMIT_STAGES
    if mcfg is None:
        mcfg = model_config(cfg, emit)
    if variables is None:
        variables = abstract_variables(mcfg, emit, s.num_soft_tokens if emit else 9,
                                       s.max_readout and emit, s.peak_location and emit,
                                       s.hot_patches if emit else 0)
    mesh = abstract_mesh(s.mesh)
    n_dev = math.prod(s.mesh)
    rows: list[Row] = []

    def total(vs, m=mesh):
        per = whole = 0
        for v in vs:
            pd, wh = array_bytes(v.shape, v.bits, v.axes, m)
            per, whole = per + pd, whole + wh
        return per, whole

    # trained parameters are stored in float32 while the stage runs (training.precision):
    # the soft prompt / projector / mlp1 copies, the LoRA factors, their gradients and AdamW state
    lora = lora_factors(variables, s.lora_targets, s.lora_rank, bits=TRAIN_BITS) \
        if s.stage in LORA_STAGES else []
    targeted = {k.path for k, _, _ in lora}
    lora_vars = [x for _, a, b in lora for x in (a, b)]
    quant = []
    if s.qtype and lora:
        quant = [x for k, _, _ in lora for x in qlora_arrays(k, s.qtype, s.tile_size)]

    # trainable set
    if s.stage in ("warmup", "base"):
        trained_full = [v for v in variables if v.kind == "Param"
                        and (s.train_vision or not v.path.startswith("vision_tower/"))]
    elif s.stage == "sft":
        trained_full = [v for v in variables if v.kind == "Param"
                        and _in_full(v.path, ("soft_prompt", "projector"))]
    else:
        trained_full = [v for v in variables if v.kind == "Param" and _in_full(v.path, TRAINED_IN_FULL)]
    trained_full = [_master(v) for v in trained_full]
    trainable = trained_full + lora_vars
    master = {v.path: v for v in trained_full}
    policy_vars = [master.get(v.path, v) for v in variables if not (quant and v.path in targeted)]
    rows.append(Row("weights", "resident", *total(policy_vars),
                    "model variables" + (" except the QLoRA-targeted kernels" if quant else "")
                    + (f"; the {len(trained_full)} trained arrays in float32" if any(
                        v.bits > 16 for v in trained_full) else "")))
    if quant:
        rows.append(Row("qlora weights", "resident", *total(quant),
                        f"{s.qtype} targeted kernels + per-{'tile' if s.tile_size else 'column'} scales"))

    if s.stage in LORA_STAGES:
        full_mods = [master[v.path] for v in variables if v.path in master]
        if s.reference == "copy" and n_dev > 1:
            ref = [master.get(v.path, v) for v in variables]
            note = "separate copy of all weights (--reference copy)"
        else:
            ref = full_mods + ([v for v in variables if v.path in targeted] if quant else [])
            note = "pre-update soft prompt / projector / mlp1" + (
                " + full-precision targeted kernels" if quant else "")
        rows.append(Row("reference", "resident", *total(ref), note))
        rows.append(Row("lora", "resident", *total(lora_vars),
                        f"r={s.lora_rank} on {len(lora)} kernels, float32"))
    rows.append(Row("optimizer", "resident", *optimizer_bytes(trainable, mesh),
                    f"AdamW mu+nu of {sum(math.prod(v.shape) for v in trainable):,} trainable"))

    # activations: this device's share, and the whole job's (unit split)
    llm_trained = s.stage in ("warmup", "base") or any(
        p.startswith(("mllm/language_model/", "language_model/")) for p in targeted)
    vit_trained = (s.stage == "base" and s.train_vision) or any(
        "vision_tower/" in p for p in targeted)
    mm_trained = s.stage in ("base",) + LORA_STAGES
    tiles = _tiles(mcfg, s)
    ce = s.batch if emit and s.use_contrastive else 0
    kw = dict(vit_trained=vit_trained, mm_trained=mm_trained, emit=emit)
    dev = activation_terms(mcfg, s, _split(mcfg, mesh, s.batch, tiles, ce), **kw)
    one = activation_terms(mcfg, s, _Split(), **kw)
    m = s.micro_batches
    if m > 1:  # the train step holds one micro-batch's activations at a time
        st = dataclasses.replace(s, batch=s.train_rows, tile_bucket=max(1, s.tile_bucket // m))
        tiles_t, ce_t = _tiles(mcfg, st), (st.batch if emit and s.use_contrastive else 0)
        dev_t = activation_terms(mcfg, st, _split(mcfg, mesh, st.batch, tiles_t, ce_t), **kw)
        one_t = activation_terms(mcfg, st, _Split(), **kw)
    else:
        dev_t, one_t = dev, one
    if s.stage == "grpo":
        rows.append(Row("kv cache", "rollout", int(dev["kv_cache"]), int(one["kv_cache"]),
                        f"{s.batch} x {s.prompt_len + s.new_tokens} tokens"))
        rows.append(Row("prefill", "rollout", int(dev["prefill"]), int(one["prefill"]),
                        "one layer's forward working set" + (
                            f", queries in chunks of {s.attention_chunk}"
                            if 0 < s.attention_chunk < s.prompt_len else "")))
    gp, gw = total(trainable)
    rows.append(Row("gradients", "train", gp * (2 if m > 1 else 1), gw * (2 if m > 1 else 1),
                    "of the trainable set, float32" + (
                        " (the running sum + one micro-batch's)" if m > 1 else "")))
    micro_note = f"; one micro-batch of {s.train_rows} of {s.batch} rows" if m > 1 else ""
    rows.append(Row("activations", "train", int(dev_t["activations"]), int(one_t["activations"]),
                    _activation_note(s) + micro_note))
    rows.append(Row("logits", "train", int(dev_t["logits"]), int(one_t["logits"]),
                    f"float32, {s.new_tokens if s.stage == 'grpo' else min(s.label_tokens, s.prompt_len)}"
                    " positions per sequence" + micro_note))
    n_params = sum(math.prod(v.shape) for v in variables if v.kind == "Param")
    tiles_asked, tiles_per_seq = tiles_per_sequence(mcfg, s)
    info = dict(arch=cfg.arch if cfg is not None else "", emit=emit, dtype=mcfg.param_dtype,
                vocab=mcfg.text.vocab_size, tokens_per_tile=mcfg.tokens_per_tile,
                tiles_per_seq_asked=tiles_asked, tiles_per_seq=tiles_per_seq,
                vocab_from=vocabulary(cfg)[2] if cfg is not None else "the model's",
                compute_dtype=mcfg.dtype, parameters=n_params, trainable=sum(
                    math.prod(v.shape) for v in trainable), lora_kernels=len(lora),
                devices=n_dev, batch=s.batch, batch_per_device=int(dev["b"]),
                micro_batches=m, micro_batch=s.train_rows,
                micro_batch_per_device=int(dev_t["b"]),
                prompt_len=s.prompt_len, new_tokens=s.new_tokens,
                train_len=s.prompt_len + s.new_tokens, tiles=tiles,
                tiles_per_device=int(dev["tiles_per_device"]),
                ce_tiles_per_device=int(dev["ce_tiles_per_device"]),
                attention_saved=int(dev_t["attention_saved"]),
                prefill_attention=int(dev.get("prefill_attention", 0)),
                remat=s.remat, attention_chunk=s.attention_chunk,
                vit_trained=vit_trained, llm_trained=llm_trained)
    return StagePlan(s, rows, info)


def _activation_note(s: Setup) -> str:
    t = s.prompt_len + s.new_tokens
    chunk = f", attention in {s.attention_chunk}-query chunks" if 0 < s.attention_chunk < t else ""
    if s.remat:
        return "remat: layer inputs + one layer recomputed + workspace" + chunk
    return "residuals of every layer (no remat) + workspace" + chunk
