"""The report: the stage's programs compiled for the slice and compared with the HBM and with
the plan; as text or JSON.

Per program and per device (GiB = 2**30 bytes) the compiler's ``memory_analysis``: arguments,
outputs (``sharded_jit`` donates nothing, so a train step's new state exists beside its old
one), temp and generated code; ``xla`` = arguments + outputs - aliased + temp + code. The
``peak`` of the device while the program runs is the larger of that and XLA's own
``peak_memory_in_bytes``, less ``shared args`` (arguments that are one buffer in a run: the
reference's weights are the policy's, which XLA counts twice when both are read), plus ``other
resident`` (arrays the stage keeps on the device that the program does not read: the optimizer
state during the sampler and the reference pass, the reference's own copies of the trained
modules, weights XLA dropped as unused). It is compared with the chip's HBM (``--hbm`` GiB per
device, or by device kind: v5p 95, v5e 16, v6e 32, v4 32 GiB per chip, shared by the devices of
a chip) less ``--headroom`` percent, and with ``emit_jax.plan``'s estimate of the phase
(resident + train for the train step, resident + rollout for the sampler; plan has no phase for
the reference pass, so ``score`` stands beside plan's resident alone, unflagged); a ratio
outside 1 +- 15 % is flagged. A program the compiler refuses for lack of HBM is reported with
the compiler's own figures. Also per program: FLOPs and bytes accessed per device
(``cost_analysis``, which counts a loop's body once, whatever its trip count), how the
executable takes the weights (its ``input_shardings`` of the frozen argument: arrays sharded,
bytes per device, the largest array's spec), which weights it never reads, and whether a
program that runs the LoRA policy reads its adapters.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from emit_jax.aot.abstract import abstract_stage, model_setup
from emit_jax.aot.suggest import advice
from emit_jax.aot.batches import step_shapes
from emit_jax.aot.compile import kernel_switches, lower_and_compile, memory_switches
from emit_jax.aot.programs import PROGRAMS, stage_programs
from emit_jax.aot.tpu import device_capacity, topology
from emit_jax.errors import AotError
from emit_jax.plan.core import plan_stage
from emit_jax.plan.devices import GiB
from emit_jax.plan.stage import stage_setup
from emit_jax.training.config import SFT_STAGES, STAGES

FLAG = 0.15  # plan vs compiler: a ratio outside 1 +- FLAG is flagged


def default_stage(cfg, mesh_shape, **kw) -> str:
    """The stage ``emit_jax.plan`` reports by default: the largest of ``config.stages``."""
    stages = [x for x in cfg.get("stages", ()) if x in STAGES]
    if not stages:
        raise AotError(f"config lists no known stage ({', '.join(STAGES)}); pass --stage")
    if len(stages) == 1:
        return stages[0]
    totals = {st: plan_stage(cfg, stage_setup(cfg, st, mesh_shape, **kw)).total
              for st in stages}
    return max(totals, key=totals.get)


def make_report(cfg, config_path: str, topology_name: str, *, mesh_spec=None, stage=None,
                prompt_len=None, label_tokens: int = 128, headroom: float = 10.0,
                hbm_gib: float | None = None, only: Sequence[str] = (), jobs: int = 1) -> dict:
    """Compile the stage's programs for ``topology_name`` and compare them with the plan;
    ``jobs`` > 1 compiles that many at once (each InternVL3-8B program takes 5-8 GB of host
    RAM while it compiles)."""
    from emit_jax import parallel

    if not 0 <= headroom < 100:
        raise AotError(f"--headroom {headroom}: a percentage in [0, 100)")
    if jobs < 1:
        raise AotError(f"--jobs {jobs}: at least 1")
    topo = topology(topology_name)
    devices = list(topo.devices)
    capacity, cap_note = device_capacity(devices, hbm_gib)
    spec = mesh_spec if mesh_spec is not None else (dict(cfg.mesh) if "mesh" in cfg else None)
    try:
        mesh = parallel.make_mesh(spec, devices=devices)
    except ValueError as e:
        raise AotError(f"mesh {spec!r} does not fit topology {topology_name} "
                       f"({len(devices)} devices): {e}") from None
    mesh_shape = tuple(int(mesh.shape[a]) for a in parallel.MESH_AXES)
    kw = dict(prompt_len=prompt_len, label_tokens=label_tokens)
    stage = stage or default_stage(cfg, mesh_shape, **kw)
    if stage not in STAGES:
        raise AotError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    mcfg, ecfg = model_setup(cfg, stage)
    shapes, setup = step_shapes(cfg, stage, mesh_shape, mcfg, **kw)
    kind = "sft" if stage in SFT_STAGES else "grpo"
    if only:
        bad = sorted(set(only) - set(PROGRAMS[kind]))
        if bad:
            names = ", ".join(repr(n) for n in bad)
            raise AotError(f"--programs: stage {stage} has no program{'s' if len(bad) > 1 else ''}"
                           f" {names}; choose from {', '.join(PROGRAMS[kind])} (or another "
                           "--stage)")
    pl = plan_stage(cfg, setup)
    ab = abstract_stage(cfg, stage, mcfg, ecfg, seed=int(cfg.get("seed", 0)))
    memory, kernels = memory_switches(cfg), kernel_switches(cfg)
    usable = int(capacity * (1 - headroom / 100))
    results = []
    st = stage_programs(cfg, stage, ab, shapes, mesh)
    todo = [p for p in st.programs if not only or p.name in only]
    done = lower_and_compile(todo, memory, st.resident, st.shared, jobs, kernels)
    for p, r in zip(todo, done):
        if r.get("error"):
            results.append(r)
            continue
        if "refused" in r:
            req = r["refused"].get("required", 0)
            r["peak"] = req - r["shared_args"] + r["other_resident"] if req else None
        else:
            r["peak"] = max(r["xla_total"], r["xla_peak"]) - r["shared_args"] + r["other_resident"]
        r["fits"] = None if r["peak"] is None else (r["peak"] <= usable and "refused" not in r)
        if p.name == "sampler":
            r["plan_phase"], est = "resident + rollout", pl.resident + pl.rollout
        elif p.name == "score":
            r["plan_phase"], est = "resident (no phase for the reference pass)", pl.resident
        else:
            r["plan_phase"], est = "resident + train", pl.resident + pl.train
        r["plan"] = est
        r["ratio"] = round(r["peak"] / est, 3) if r["peak"] and est else None
        r["flag"] = bool(r["ratio"] is not None and p.name != "score"
                         and abs(r["ratio"] - 1) > FLAG)
        results.append(r)
    rep = dict(
        config=config_path, stage=stage, topology=topology_name,
        device_kind=devices[0].device_kind, devices=len(devices),
        mesh=dict(zip(parallel.MESH_AXES, mesh_shape)), capacity=capacity, capacity_note=cap_note,
        headroom_pct=headroom, usable=usable, unit="bytes per device; GiB = 2**30",
        model=dict(arch=cfg.arch, emit=ecfg is not None, param_dtype=mcfg.param_dtype,
                   dtype=mcfg.dtype, heatmap_strategy=ecfg.heatmap_strategy if ecfg else None),
        memory=memory, kernels=kernels, shapes=dataclasses.asdict(shapes),
        abstract_s=round(ab.seconds, 1),
        plan=dict(resident=pl.resident, rollout=pl.rollout, train=pl.train, total=pl.total),
        programs=results)
    rep["fits"] = all(r["fits"] for r in results)
    rep["advice"] = advice(rep, cfg, pl, setup, usable)
    return rep


def format_report(rep: dict) -> str:
    g = lambda x: "-" if x is None else f"{x / GiB:.2f}"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in rep["mesh"].items())
    s, m = rep["shapes"], rep["model"]
    step = (f"{s['batch']} sequences x {s['prompt_len']} prompt"
            + (f" + {s['new_tokens']} new tokens" if s["new_tokens"] else
               f" tokens ({s['label_tokens']} label positions each)")
            + f", {s['tiles']} image tiles, {s['ce']} CE pairs"
            + (f"; train step in {s['micro']} micro-batches of {s['batch'] // s['micro']}"
               if s["micro"] > 1 else ""))
    lines = [
        f"TPU compile: {rep['config']}, stage {rep['stage']}, topology {rep['topology']} "
        f"({rep['devices']} x {rep['device_kind']}), mesh {mesh}",
        f"HBM per device {rep['capacity'] / GiB:.2f} GiB ({rep['capacity_note']}); "
        f"{rep['headroom_pct']:g}% reserved: {rep['usable'] / GiB:.2f} usable",
        f"model {m['arch']}{' + EMIT' if m['emit'] else ''}, params {m['param_dtype']}, compute "
        f"{m['dtype']}" + (f", heat map '{m['heatmap_strategy']}'" if m["heatmap_strategy"] else "")
        + "; memory: " + ", ".join(f"{k} {v if v else 'off'}" if not isinstance(v, bool) else
                                   f"{k} {'on' if v else 'off'}"
                                   for k, v in rep["memory"].items())
        + "; kernels: " + ", ".join(f"{k} {v}" for k, v in rep.get("kernels", {}).items()),
        f"step: {step}",
        "sizes in GiB per device (2**30 bytes); xla = arguments + outputs - aliased + temp + code;",
        "peak = max(xla, XLA's own peak) - shared args + other resident, against the usable HBM",
        "",
        f"{'program':<11}{'args':>8}{'outputs':>8}{'temp':>8}{'code':>7}{'xla':>8}{'shared':>8}"
        f"{'other':>8}{'peak':>8}{'plan':>8}{'ratio':>7}  {'fits':<5}{'compile s':>10}",
    ]
    for r in rep["programs"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}" + ("!" if r["flag"] else "")
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        if r.get("error"):
            lines.append(f"{r['name']:<11}{'failed to lower or compile (below)':>39}")
            continue
        if r.get("refused"):
            lines.append(f"{r['name']:<11}{'refused by the compiler':>39}{g(r['shared_args']):>8}"
                         f"{g(r['other_resident']):>8}{g(r['peak']):>8}{g(r['plan']):>8}"
                         f"{ratio:>7}  {fits:<5}{r['compile_s']:>10.1f}")
        else:
            lines.append(f"{r['name']:<11}{g(r['arguments']):>8}{g(r['outputs']):>8}"
                         f"{g(r['temp']):>8}{g(r['code']):>7}{g(r['xla_total']):>8}"
                         f"{g(r['shared_args']):>8}{g(r['other_resident']):>8}{g(r['peak']):>8}"
                         f"{g(r['plan']):>8}{ratio:>7}  {fits:<5}{r['compile_s']:>10.1f}")
    lines.append("")
    for r in rep["programs"]:
        if r.get("error"):
            lines.append(f"{r['name']}: FAILED: {r['error']}")
            lines += [f"  at {w}" for w in r["where"]]
            continue
        lines.append(f"{r['name']}: plan = {r['plan_phase']}; lowered in {r['lower_s']:.1f} s, "
                     f"compiled in {r['compile_s']:.1f} s")
        if r.get("refused"):
            lines.append(f"  compiler: {r['refused']['message'][:600]}")
        else:
            lines.append(f"  {r['flops'] / 1e12:.3f} TFLOP*, {r['bytes_accessed'] / GiB:.2f} GiB* "
                         f"accessed per device; XLA's own peak {g(r['xla_peak'])} GiB; state out: "
                         f"{r['state_out']['sharded']} of {r['state_out']['arrays']} arrays "
                         "sharded")
        if r.get("xla_peak", 0) > r.get("xla_total", 0):
            lines.append(f"  XLA's own peak {g(r['xla_peak'])} GiB is above arguments + outputs + "
                         f"temp + code ({g(r['xla_total'])} GiB): the peak is used")
        w = r["weights"]
        big = w["largest"]
        lines.append(f"  weights (frozen argument): {w['used']} arrays used, {w['sharded']} of "
                     f"them sharded, {w['whole'] / GiB:.2f} GiB whole -> "
                     f"{w['per_device'] / GiB:.2f} GiB per device"
                     + (f"; largest {big['path']} {big['shape']} as {big['spec']}" if big else ""))
        if w.get("lora_ignored"):
            lines.append(f"  ! none of the policy's {w['lora_factors']} LoRA factors is read: "
                         f"this program runs the policy without its adapters")
        if w["unused"]:
            lines.append(f"  {w['unused']} weight arrays ({w['unused_whole'] / GiB:.3f} GiB "
                         f"whole) not read by this program (XLA dropped them), e.g. "
                         + ", ".join(w["unused_examples"]))
        if r["shared_args"] or r["other_resident"]:
            lines.append(f"  shared args {g(r['shared_args'])} GiB (one buffer passed twice), "
                         f"other resident {g(r['other_resident'])} GiB (the stage's arrays this "
                         f"program does not read: optimizer, unused weights, reference copies)")
        if r["flag"]:
            lines.append(f"  ! plan and compiler differ by {abs(r['ratio'] - 1) * 100:.0f}% "
                         f"(plan {g(r['plan'])} GiB, compiler's peak {g(r['peak'])} GiB)")
    lines.append("* XLA's cost_analysis counts a loop's body once: scans over micro-batches, "
                 "attention and ViT chunks and the decode loop are not multiplied by their trip "
                 "counts")
    p = rep["plan"]
    lines.append(f"plan ({'emit_jax.plan'}): resident {g(p['resident'])}, rollout "
                 f"{g(p['rollout'])}, train {g(p['train'])}, total {g(p['total'])} GiB per device")
    lines.append("")
    if rep["fits"]:
        lines.append(f"fits: every program within {rep['usable'] / GiB:.2f} GiB per device")
    else:
        failed = any(r.get("error") for r in rep["programs"])
        lines.append("does not fit" + (" (or did not compile)" if failed else "") + ":")
        lines += [f"  {a}" for a in rep["advice"]]
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    out = dict(rep)
    out["capacity_gib"] = round(rep["capacity"] / GiB, 4)
    out["usable_gib"] = round(rep["usable"] / GiB, 4)
    for r in out["programs"]:
        for k in ("arguments", "outputs", "temp", "code", "xla_total", "peak", "plan",
                  "shared_args", "other_resident"):
            if r.get(k) is not None:
                r[k + "_gib"] = round(r[k] / GiB, 4)
    return json.dumps(out, indent=1, default=str)
