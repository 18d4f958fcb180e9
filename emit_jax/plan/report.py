"""The plan of a config on a mesh and a device as a report: the largest stage's plan, the
verdict against the device's memory less the headroom, suggestions when it does not fit; as
text or JSON."""

from __future__ import annotations

import dataclasses
import json
import math

from emit_jax.errors import PlanError
from emit_jax.plan.advice import suggestions
from emit_jax.plan.core import StagePlan, plan_stage
from emit_jax.plan.devices import DEVICES, GiB, device_capacity
from emit_jax.plan.stage import stage_setup
from emit_jax.training.config import LORA_STAGES, STAGES


def make_report(cfg, config_path: str, mesh: tuple, device: str, headroom: float, *,
                stage: str | None = None, prompt_len: int | None = None, label_tokens: int = 128,
                images_per_sample: int = 2, reference: str = "shared", want_suggestions=True) -> dict:
    """The full plan as a JSON-able dict (``plan`` holds the chosen stage's StagePlan)."""
    capacity = device_capacity(device)
    if not 0 <= headroom < 100:
        raise PlanError(f"--headroom {headroom}: a percentage in [0, 100)")
    stages = [x for x in cfg.get("stages", ()) if x in STAGES]
    if stage is not None:
        if stage not in STAGES:
            raise PlanError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
        chosen = [stage]
    else:
        if not stages:
            raise PlanError(f"config lists no known stage ({', '.join(STAGES)}); pass --stage")
        chosen = stages
    plans = {}
    for st in chosen:
        s = stage_setup(cfg, st, mesh, prompt_len=prompt_len, label_tokens=label_tokens,
                        images_per_sample=images_per_sample, reference=reference)
        plans[st] = plan_stage(cfg, s)
    worst = max(plans, key=lambda k: plans[k].total)
    plan = plans[worst]
    usable = int(capacity * (1 - headroom / 100))
    fits = plan.total <= usable
    rep = dict(
        config=config_path, stage=worst, stages={k: p.total for k, p in plans.items()},
        mesh=dict(zip(("data", "fsdp", "tensor"), mesh)), devices=math.prod(mesh),
        device=device, device_note=DEVICES[device][1], capacity=capacity, headroom_pct=headroom,
        usable=usable, fits=fits, unit="bytes; GiB = 2**30",
        rows=[dataclasses.asdict(r) for r in plan.rows],
        resident=plan.resident, rollout=plan.rollout, train=plan.train, total=plan.total,
        whole=dict(resident=plan.whole("resident"), rollout=plan.whole("rollout"),
                   train=plan.whole("train"), total=plan.whole_total),
        info=plan.info, setup=dataclasses.asdict(plan.setup),
        suggestions=[] if fits or not want_suggestions else suggestions(cfg, plan, usable),
        plan=plan)
    return rep


def format_report(rep: dict) -> str:
    plan: StagePlan = rep["plan"]
    info, s = plan.info, plan.setup
    g = lambda x: f"{x / GiB:10.2f}"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in rep["mesh"].items())
    lines = [
        f"memory plan: {rep['config']}, stage {rep['stage']}"
        + (f" (of {', '.join(rep['stages'])}: largest)" if len(rep["stages"]) > 1 else ""),
        f"model {info['arch']}{' + EMIT' if info['emit'] else ''}: {info['parameters'] / 1e9:.3f} B "
        f"parameters in {info['dtype']}, {info['trainable']:,} trainable"
        + (f", vocabulary {info['vocab_from']}"
           if info["vocab_from"] not in ("the checkpoint's", "the model's") else "")
        + (f" (LoRA r={s.lora_rank} on {info['lora_kernels']} kernels"
           + (f", QLoRA {s.qtype}" if s.qtype else "") + ")" if s.stage in LORA_STAGES else ""),
        f"mesh {mesh} ({rep['devices']} devices), {rep['device']}: {rep['device_note']}",
        f"step: {info['batch']} sequences ({info['batch_per_device']} per device"
        + (f"; trained in {info['micro_batches']} micro-batches of {info['micro_batch']}, "
           f"{info['micro_batch_per_device']} per device" if info.get("micro_batches", 1) > 1 else "")
        + ") x "
        f"{info['train_len']} tokens (prompt {info['prompt_len']}"
        + (f" + {info['new_tokens']} new" if info["new_tokens"] else "")
        + f"), {info['tiles']} image tiles ({info['tiles_per_device']} per device)",
        f"memory: remat {'on' if s.remat else 'off'}, attention_chunk "
        f"{s.attention_chunk or 'off'}, vit_chunk {s.vit_chunk or 'off'} (config memory.remat / "
        "memory.attention_chunk / memory.vit_chunk)",
        "sizes in GiB (2**30 bytes); whole = unsharded (all sequences of the step, weights once)",
        "",
        f"{'component':<14}{'phase':<10}{'per device':>10}  {'whole':>10}  note",
    ]
    for r in plan.rows:
        lines.append(f"{r.name:<14}{r.phase:<10}{g(r.per_device)}  {g(r.whole)}  {r.note}")
    lines += [
        f"{'resident':<24}{g(plan.resident)}  {g(plan.whole('resident'))}",
        f"{'rollout peak':<24}{g(plan.rollout)}  {g(plan.whole('rollout'))}",
        f"{'train peak':<24}{g(plan.train)}  {g(plan.whole('train'))}",
        f"{'total':<24}{g(plan.total)}  {g(plan.whole_total)}  = resident + max(rollout, train)",
    ]
    if len(rep["stages"]) > 1:
        lines.append("per stage: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in rep["stages"].items()))
    lines.append("")
    cap, hr = rep["capacity"] / GiB, rep["headroom_pct"]
    if rep["fits"]:
        lines.append(f"fits on {rep['device']} ({plan.total / GiB:.2f} of {cap:.2f} GiB, "
                     f"{hr:g}% reserved)")
    else:
        lines.append(f"does not fit on {rep['device']} ({cap:.2f} GiB, {hr:g}% reserved: "
                     f"{rep['usable'] / GiB:.2f} usable): needs {plan.total / GiB:.2f} GiB; "
                     f"suggestions: " + "; ".join(rep["suggestions"]))
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    out = {k: v for k, v in rep.items() if k != "plan"}
    for r in out["rows"]:
        r["per_device_gib"] = round(r["per_device"] / GiB, 4)
        r["whole_gib"] = round(r["whole"] / GiB, 4)
    out["total_gib"] = round(rep["total"] / GiB, 4)
    out["capacity_gib"] = round(rep["capacity"] / GiB, 4)
    out["usable_gib"] = round(rep["usable"] / GiB, 4)
    return json.dumps(out, indent=1, default=str)
