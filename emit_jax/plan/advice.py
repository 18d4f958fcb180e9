"""What to change when a plan does not fit: one-change what-ifs (knobs, mildest first), each
re-planned, then the knobs combined greedily."""

from __future__ import annotations

import dataclasses
import re

from emit_jax.plan.core import StagePlan, plan_stage
from emit_jax.plan.devices import GiB
from emit_jax.plan.stage import Setup
from emit_jax.training.config import LORA_STAGES, GRPOConfig


def _variant(s: Setup, **changes) -> Setup:
    """``s`` with ``changes``; grpo's tile bucket follows its batch and ``max_tiles``."""
    s2 = dataclasses.replace(s, **changes)
    if s2.stage == "grpo":
        s2 = dataclasses.replace(s2, tile_bucket=s2.batch * 2 * s2.max_tiles)
    return s2


def _knobs(cfg, s: Setup) -> list[tuple[str, list]]:
    """One-change what-ifs, mildest first: ``(knob, [(label, Setup), ...])``."""
    d, f, t = s.mesh
    knobs = []
    # gradient accumulation first: the same update, one micro-batch's activations at a time
    cur = s.train_rows
    micro = [mb for mb in (s.batch // 2 ** k for k in range(1, 12))
             if mb < cur and mb >= d * f and s.batch % mb == 0 and mb % (d * f) == 0]
    if micro:
        knobs.append(("gradient accumulation", [(f"--set {s.stage}.micro_batch_size={mb}",
                                                 _variant(s, micro_batch=mb)) for mb in micro]))
    # the memory switches first: same training, more compute (emit_jax.models.memory)
    if not s.remat:
        knobs.append(("rematerialisation", [("--set memory.remat=True", _variant(s, remat=True))]))
    chunks = (1024, 512, 256, 128)
    if not s.attention_chunk:
        knobs.append(("query-chunked attention", [(f"--set memory.attention_chunk={c}",
                                                   _variant(s, attention_chunk=c)) for c in chunks]))
    else:
        knobs.append(("smaller attention chunks", [(f"--set memory.attention_chunk={c}",
                                                    _variant(s, attention_chunk=c))
                                                   for c in chunks if c < s.attention_chunk]))
    if not s.vit_chunk:
        knobs.append(("ViT in tile chunks", [(f"--set memory.vit_chunk={k}", _variant(s, vit_chunk=k))
                                             for k in (64, 32, 16, 8)]))
    if s.stage in LORA_STAGES and s.lora_rank and re.search(r"vision|attention/|fc1|fc2",
                                                             s.lora_targets):
        llm_only = rf"(?=.*language_model/)(?:{s.lora_targets})"
        knobs.append(("LoRA on the LLM only", [("no LoRA on the ViT (grpo.lora.targets "
                                                "restricted to language_model/)",
                                                _variant(s, lora_targets=llm_only))]))
    if s.max_tiles > 1:
        knobs.append(("fewer tiles", [(f"--set data.max_tiles={m}", _variant(s, max_tiles=m))
                                      for m in range(s.max_tiles - 1, 0, -1)]))
    buckets = sorted({int(x) for x in (cfg.data.get("length_buckets", ()) if cfg is not None else ())}
                     or {s.prompt_len // 2 ** k for k in range(1, 4)}, reverse=True)
    prompts = ("shorter prompts", [(f"--prompt_len {n} (data.length_buckets up to {n})",
                                    _variant(s, prompt_len=n)) for n in buckets if n < s.prompt_len])
    knobs.append(prompts)
    if s.stage == "grpo" and cfg is not None:
        gc = GRPOConfig.from_section(cfg.grpo)
        g, n = gc.G, gc.prompts_per_step
        knobs.append(("fewer G", [(f"--set grpo.G={g2}", _variant(s, batch=n * g2))
                                  for g2 in (g // 2 ** k for k in range(1, 8)) if g2 >= 2]))
    else:
        knobs.append(("smaller batch", [(f"--set {s.stage}.batch_size={b2}", _variant(s, batch=b2))
                                        for b2 in (s.batch // 2 ** k for k in range(1, 12)) if b2 >= 1]))
    knobs.append(("larger fsdp", [(f"--mesh fsdp={f * 2 ** k} ({d * f * 2 ** k * t} devices)",
                                   _variant(s, mesh=(d, f * 2 ** k, t)))
                                  for k in range(1, 13) if d * f * 2 ** k * t <= 4096]))
    return knobs


def suggestions(cfg, plan: StagePlan, usable: int, mcfg=None) -> list[str]:
    """What-ifs that change one thing and re-plan (cheap: the abstract model is cached), then
    the knobs combined greedily (each at its mildest fitting level, else its strongest)."""
    s = plan.setup

    def total(s2):
        return plan_stage(cfg, s2, mcfg=mcfg).total

    def gib(x):
        return f"{x / GiB:.1f} GiB"

    out = []
    now = plan.total
    for name, options in _knobs(cfg, s):
        hit = next(((label, tot) for label, s2 in options if (tot := total(s2)) <= usable), None)
        if hit:
            out.append(f"{name}: {hit[0]} needs {gib(hit[1])}")
        elif options:
            label, tot = min(((lb, total(s2)) for lb, s2 in options), key=lambda x: x[1])
            if tot < 0.99 * now:  # knobs that change nothing here are left out
                out.append(f"{name}: not enough alone (at best {label}: {gib(tot)})")
    if s.stage in LORA_STAGES and not s.qtype and (tot := total(_variant(s, qtype="nf4"))) < 0.99 * now:
        out.append(f"QLoRA (--set grpo.lora.weight_qtype=nf4) needs {gib(tot)} (only the policy's "
                   "targeted kernels shrink: the frozen reference keeps full-precision weights)")
    cur, steps = s, {}
    for _ in range(3):  # greedy passes: a knob may start to matter once others moved
        before = dict(steps)
        for name, _ in _knobs(cfg, s):
            if total(cur) <= usable:
                break
            options = dict(_knobs(cfg, cur)).get(name, [])
            if not options:
                continue
            label, chosen = next(((lb, s2) for lb, s2 in options if total(s2) <= usable),
                                 min(options, key=lambda o: total(o[1])))
            if total(chosen) < 0.99 * total(cur):
                cur = chosen
                steps[name] = label
        if steps == before or total(cur) <= usable:
            break
    steps = list(steps.values())
    if len(steps) > 1:
        tot = total(cur)
        out.append(f"combined: {'; '.join(steps)} -> {gib(tot)} "
                   f"({'fits' if tot <= usable else 'still does not fit'})")
    att = plan.info["attention_saved"]
    if plan.train and att > 0.4 * plan.train and not s.attention_chunk:
        out.append(f"the materialised [b, H, T, T] attention matrices are {gib(att)} of the train "
                   f"step's {gib(plan.train)}: memory.attention_chunk (and memory.remat) remove "
                   "most of it")
    return out
