"""What to change when a program does not fit: which, by how much, the memory switches, gradient
accumulation or more chips, and the plan's what-ifs."""

from __future__ import annotations

from emit_jax.plan.advice import suggestions
from emit_jax.plan.devices import GiB


def advice(rep: dict, cfg, pl, setup, usable: int) -> list[str]:
    """For every program that does not fit: which, by how much, and what to change."""
    out = []
    stage, mem = rep["stage"], rep["memory"]
    batch_key = "grpo.prompts_per_step / grpo.G" if stage == "grpo" else f"{stage}.batch_size"
    for r in rep["programs"]:
        if r["fits"]:
            continue
        g = lambda x: f"{x / GiB:.2f} GiB"  # noqa: E731
        if r.get("error"):
            out.append(f"{r['name']}: did not lower or compile ({r['error'][:200]}): a bug in the "
                       "program, not a memory verdict")
            continue
        if r.get("refused"):
            ref = r["refused"]
            head = (f"{r['name']}: the TPU compiler refused it (needs {g(ref['required'])} of "
                    f"{g(ref['available'])} HBM" if ref.get("required") and ref.get("available")
                    else f"{r['name']}: the TPU compiler refused it ({ref['message'][:200]}")
            head += ")"
        else:
            head = (f"{r['name']}: needs {g(r['peak'])} per device, {g(r['peak'] - usable)} over "
                    f"the {g(usable)} usable")
        tips = []
        temp = r.get("temp", 0)
        fixed = r.get("arguments", 0) - r.get("shared_args", 0) + r.get("other_resident", 0)
        if r.get("refused") or temp >= fixed:
            if not mem.get("remat"):
                tips.append("memory.remat=True")
            if not mem.get("attention_chunk") or mem["attention_chunk"] > 512:
                tips.append("a smaller memory.attention_chunk (e.g. 512)")
            if "vit_chunk" in mem and not mem["vit_chunk"]:
                tips.append("memory.vit_chunk (image tiles per ViT chunk)")
            if r["name"] == "sampler":
                tips.append(f"fewer rows per sampler call ({batch_key}) or a shorter "
                            "grpo.max_new_tokens (KV cache and prefill scale with them)")
            else:
                rows = rep["shapes"]["batch"] // rep["shapes"]["micro"]
                tips.append(f"--config.{stage}.micro_batch_size={max(1, rows // 2)} (gradient "
                            f"accumulation; {rows} rows at a time now) or a smaller {batch_key}")
        if fixed > 0.5 * usable or not tips:
            d, f, t = setup.mesh
            tips.append(f"more chips on fsdp (--mesh fsdp={2 * f} on a slice of {2 * d * f * t} "
                        "devices): weights, optimizer and batch all divide")
        out.append(head + "; try " + "; ".join(tips))
    if any(r["fits"] is False and not r.get("error") for r in rep["programs"]):
        try:
            what_ifs = suggestions(cfg, pl, usable)
        except Exception:  # noqa: BLE001 - the plan's what-ifs are a bonus
            what_ifs = []
        out += [f"plan's what-ifs: {w}" for w in what_ifs[:6]]
    return out
