"""The prepared GPU check: ``python -m bench gpu`` (one accelerator, a few minutes).

Builds an InternVL3-shaped EMIT model with random bf16 weights (InternVL3-8B by default;
``--text-layers`` / ``--vision-layers`` keep the 8B width with fewer layers when compiling the
whole model does not fit a short window), then times, with the config's memory switches
(``memory.remat`` / ``attention_chunk`` / ``vit_chunk``) and precision (bf16 frozen weights,
float32 trained parameters and AdamW state):

- one **SFT step** (EMIT stage 1: soft prompt + heat-map projector trained, the MLLM frozen) on
  ``--sft-batch`` rows of ``--prompt-len`` tokens, two images of ``--tiles`` tiles each and a CE
  pair per row;
- one **GRPO step** (stage 2: LoRA from the config on the LLM and ViT linears, soft prompt /
  projector / mlp1 in full): sampling ``--prompts`` x ``--G`` completions of ``--new-tokens``
  tokens (no EOS), the reference log-probs and the learner update, each phase timed, with the
  config's ``grpo.micro_batch_size`` scaled to this batch (``--micro``).

Reported per step: seconds (median of ``--steps`` after the compiling one), model FLOPs from
XLA's cost analysis of the compiled programs, MFU against ``--peak-tflops`` (790: an H200's
dense bf16 figure used by the issue), the device's peak memory in use (``memory_stats``)
against the compiler's figure (arguments + outputs + temporaries of the program) and the
memory plan's (``emit_jax.plan`` for the same shapes on one device). One JSON object.

On the CPU (CI) it runs at ``--arch tiny`` so that it stays working: about a minute with
``--text-layers 2 --vision-layers 2 --prompt-len 512 --new-tokens 8 --steps 1`` (the test's
sizes), several minutes with the defaults (a 2048-token prompt, 256 new tokens) on a 2-core
host; there the device reports no memory statistics and the FLOP rate means nothing.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emit_jax import configs

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class GpuCheck:
    config: str = "configs/internvl3_8b_grpo.py"
    arch: str = "internvl3_8b"
    text_layers: int = 0  # 0 = the architecture's
    vision_layers: int = 0
    sft_batch: int = 4
    prompts: int = 1
    G: int = 8
    micro: int = 4  # GRPO completions per micro-batch (0 = all at once)
    prompt_len: int = 2048
    new_tokens: int = 256
    tiles: int = 1  # tiles per image (two images per row)
    steps: int = 2
    peak_tflops: float = 790.0
    seed: int = 0


def _model(c: GpuCheck):
    """A random bf16 EMIT model of ``c.arch`` (layers overridden)."""
    from flax import nnx

    from emit_jax.models.emit import EMIT, EMITConfig
    from emit_jax.models.internvl import InternVL

    base = InternVL(_model_config(c), rngs=nnx.Rngs(c.seed))
    return EMIT.create(base, EMITConfig(bn_mode="official"), rngs=nnx.Rngs(c.seed),
                       hint_ids=list(range(1, 10)))


def _model_config(c: GpuCheck):
    """The InternVL config of ``c.arch`` in bf16, its layer counts overridden."""
    from emit_jax.models import architectures

    mcfg = architectures.get_config(c.arch, dtype="bfloat16")
    if c.text_layers:
        mcfg = mcfg.replace(text=dataclasses.replace(mcfg.text, num_hidden_layers=c.text_layers))
    if c.vision_layers:
        mcfg = mcfg.replace(vision=dataclasses.replace(mcfg.vision,
                                                       num_hidden_layers=c.vision_layers))
    return mcfg.validate()


def _batch(model, rows: int, c: GpuCheck, *, labels: bool, seed: int = 0) -> dict:
    """A collated batch as the pipeline makes it: ``rows`` prompts of ``c.prompt_len`` tokens
    with two images of ``c.tiles`` tiles and one CE pair each (``<COMP_CONTEXT>`` slots)."""
    mc = model.config
    rs = np.random.RandomState(seed)
    T, S = c.prompt_len, mc.vision.image_size
    k_img = 2 * c.tiles * mc.tokens_per_tile
    n_comp = model.num_comp_slots
    if k_img + n_comp + 24 > T:
        from emit_jax.errors import ConfigError

        raise ConfigError(f"--prompt-len {T} is too short for {k_img} image tokens and {n_comp} "
                          f"<COMP_CONTEXT> slots (and 24 text tokens)")
    ids = rs.randint(1, min(mc.text.vocab_size - 8, 100_000), size=(rows, T)).astype(np.int32)
    ids[:, 4:4 + k_img] = mc.image_token_id
    ids[:, 8 + k_img:8 + k_img + n_comp] = model.emit_config.comp_token_id
    lab = np.full((rows, T), -100, np.int32)
    if labels:
        lab[:, -16:] = ids[:, -16:]
    n_tiles = rows * 2 * c.tiles
    return {"input_ids": ids, "labels": lab, "attention_mask": np.ones((rows, T), np.int32),
            "pixel_values": rs.randn(n_tiles, 3, S, S).astype(np.float32),
            "num_tiles": np.int32(n_tiles),
            "ce_pixels": rs.randn(rows, 2, 3, S, S).astype(np.float32),
            "num_ce": np.int32(rows), "use_comp": np.ones(rows, bool),
            "row_tiles": np.full(rows, 2 * c.tiles, np.int32)}


def _compiled(fn, *args) -> dict:
    """XLA's figures for ``fn`` (a ``sharded_jit`` over a one-device mesh) on ``args``."""
    lowered = fn.lower(*args)
    t0 = time.perf_counter()
    comp = lowered.compile()
    m = comp.memory_analysis()
    cost = comp.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {"compile_s": time.perf_counter() - t0, "flops": float((cost or {}).get("flops", 0.0))}
    if m is not None:
        out.update(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
                   temp_bytes=m.temp_size_in_bytes,
                   total_bytes=m.argument_size_in_bytes + m.output_size_in_bytes
                   + m.temp_size_in_bytes - getattr(m, "alias_size_in_bytes", 0))
    return out


def _peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _timed(fn, steps: int) -> tuple[float, list[float]]:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return first, times


def _plan(stage: str, rows: int, c: GpuCheck, mcfg) -> int:
    """The memory plan's total for this check's shapes on one device (bytes)."""
    from emit_jax import plan

    cfg = configs.load(c.config)  # a fresh copy to override
    if stage == "sft":
        cfg.sft.batch_size, cfg.sft.micro_batch_size = rows, 0
    else:
        cfg.grpo.prompts_per_step, cfg.grpo.G = c.prompts, c.G
        cfg.grpo.max_new_tokens, cfg.grpo.micro_batch_size = c.new_tokens, c.micro
    s = plan.stage_setup(cfg, stage, (1, 1, 1), prompt_len=c.prompt_len)
    s = dataclasses.replace(s, max_tiles=c.tiles)
    return plan.plan_stage(cfg, s, mcfg=mcfg).total  # mcfg: the EMIT model's (with its token)


def run(c: GpuCheck) -> dict[str, Any]:
    from flax import nnx

    from emit_jax import parallel
    from emit_jax.models.memory import memory_options
    from emit_jax.ops.sampling import generate
    from emit_jax.rl import grpo as G_
    from emit_jax.training import micro
    from emit_jax.training.grpo import _step_inputs, make_grpo_fns
    from emit_jax.training.lora import apply_lora, trainable_filter
    from emit_jax.training.config import GRPOConfig, LoRAConfig, OptimConfig
    from emit_jax.training.optim import make_train_state
    from emit_jax.training.sft import make_train_step, to_device

    cfg = configs.load(c.config)
    mem = dict(cfg.get("memory") or {})
    mesh = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    t0 = time.perf_counter()
    model = _model(c)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    out: dict[str, Any] = {"bench": "gpu", "device": f"{jax.devices()[0].platform}:"
                           f"{jax.devices()[0].device_kind}", "check": dataclasses.asdict(c),
                           "memory_options": mem, "init_s": time.perf_counter() - t0,
                           "parameters": sum(int(np.prod(x.shape)) for x in
                                             jax.tree.leaves(nnx.state(model, nnx.Param)))}
    peak = c.peak_tflops * 1e12
    mcfg = model.config
    with memory_options(**mem):
        # ---- SFT (stage 1): soft prompt + projector, the MLLM frozen
        wrt = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("soft_prompt"),
                                         nnx.PathContains("projector")))
        model.train()
        opt = make_train_state(model, OptimConfig(steps=100, lr=1e-5), wrt)
        step = make_train_step(wrt, mesh)
        b = to_device(_batch(model, c.sft_batch, c, labels=True))
        xla = _compiled(step, model, opt, b)
        first, times = _timed(lambda: step(model, opt, b), c.steps)
        med = statistics.median(times)
        out["sft"] = {"rows": c.sft_batch, "tokens": c.sft_batch * c.prompt_len,
                      "s_per_step": med, "s_all": times, "first_s": first, **xla,
                      "mfu": xla["flops"] / med / peak if med else None,
                      "peak_bytes_in_use": _peak_bytes(),
                      "plan_bytes": _plan("sft", c.sft_batch, c, mcfg)}
        # ---- GRPO (stage 2): LoRA policy, sampling, reference log-probs, the update
        rows = c.prompts * c.G
        prompt = _batch(model, rows, c, labels=False, seed=1)
        policy = apply_lora(model, {k: v[:1] if k in ("input_ids", "attention_mask") else v
                                    for k, v in prompt.items()}, LoRAConfig.from_section(cfg.grpo.lora), seed=c.seed)
        gwrt = trainable_filter()
        gopt = make_train_state(policy, OptimConfig(steps=100, lr=1e-5, weight_decay=0.1), gwrt)
        n_micro = micro.micro_count(rows, c.micro, "--prompts x --G")
        score, train_step = make_grpo_fns(GRPOConfig.from_section(cfg.grpo), gwrt, mesh=mesh,
                                          micro_batches=n_micro)
        phases: dict[str, list[float]] = {"generate": [], "ref_logprobs": [], "update": []}
        xla_g: dict = {}
        for k in range(c.steps + 1):
            ta = time.perf_counter()
            policy.eval()
            gen = generate(policy, prompt["input_ids"], prompt["attention_mask"],
                           jnp.asarray(prompt["pixel_values"]),
                           ce_pixels=jnp.asarray(prompt["ce_pixels"]),
                           max_new_tokens=c.new_tokens, eos_token_id=None, temperature=1.0,
                           top_k=50, top_p=0.9, rng=jax.random.key(k), mesh=mesh)
            toks = np.asarray(jax.block_until_ready(gen.tokens))
            tb = time.perf_counter()
            cmask = np.ones_like(toks, np.int32)
            adv = G_.group_advantages(jnp.asarray(np.random.RandomState(k).randn(rows),
                                                  jnp.float32), c.G)
            policy.train()
            bb, ct, cm, ad = _step_inputs(prompt, toks, cmask, adv, n_micro)
            ref, old = score(policy, model, bb, ct, cm)
            jax.block_until_ready(ref)
            tc = time.perf_counter()
            if k == 0:
                xla_g = {"score": _compiled(score, policy, model, bb, ct, cm),
                         "train_step": _compiled(train_step, policy, gopt, bb, ct, cm, ad, ref, old)}
            td = time.perf_counter()
            loss, _, ok = train_step(policy, gopt, bb, ct, cm, ad, ref, old)
            jax.block_until_ready(loss)
            te = time.perf_counter()
            if k:
                for name, dt in zip(phases, (tb - ta, tc - tb, te - td)):
                    phases[name].append(dt)
        med = {k: statistics.median(v) for k, v in phases.items()}
        learn = med["ref_logprobs"] + med["update"]
        flops = xla_g["score"]["flops"] + xla_g["train_step"]["flops"]
        out["grpo"] = {"rows": rows, "micro_batches": n_micro,
                       "tokens": rows * (c.prompt_len + c.new_tokens),
                       "s_per_step": sum(med.values()), "phase_s": med, **{
                           f"xla_{k}": v for k, v in xla_g.items()},
                       "mfu_learner": flops / learn / peak if learn else None,
                       "loss_finite": bool(ok), "peak_bytes_in_use": _peak_bytes(),
                       "plan_bytes": _plan("grpo", rows, c, mcfg)}
    return out


def add_arguments(p) -> None:
    """One flag per :class:`GpuCheck` field, each range-checked on the command line (a count
    where 0 means "the default" or "all at once" may be 0; ``--G`` is at least 2)."""
    from emit_jax import cli
    from emit_jax.models.architectures import ARCHITECTURES

    from emit_jax.limits import MAX_BATCH, MAX_LAYERS, MAX_TILES, MAX_TOKENS

    types = {"text_layers": cli.int_in(0, MAX_LAYERS), "vision_layers": cli.int_in(0, MAX_LAYERS),
             "micro": cli.nonneg_int, "seed": cli.nonneg_int, "G": cli.int_in(2, MAX_BATCH),
             "peak_tflops": cli.positive_float, "tiles": cli.int_in(1, MAX_TILES),
             "prompt_len": cli.int_in(1, MAX_TOKENS), "new_tokens": cli.int_in(1, MAX_TOKENS)}
    d = GpuCheck()
    for f in dataclasses.fields(GpuCheck):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        kind = types.get(f.name, cli.positive_int if isinstance(default, int) else type(default))
        p.add_argument(flag, type=kind, default=default,
                       **({"choices": sorted(ARCHITECTURES)} if f.name == "arch" else {}))


def from_args(args) -> GpuCheck:
    """The check the flags ask for; a prompt too short for its images is refused here, before
    the model is built (sixteenth probe: a ValueError traceback after 91 s)."""
    from emit_jax.errors import ConfigError
    from emit_jax.models import architectures

    c = GpuCheck(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GpuCheck)})
    k_img = 2 * c.tiles * architectures.get_config(c.arch).tokens_per_tile
    if k_img + 24 > c.prompt_len:
        raise ConfigError(f"--prompt-len {c.prompt_len} is too short for {k_img} image tokens "
                          f"(two images of --tiles {c.tiles} tiles) and the text")
    check_host_memory(c)
    return c


def check_host_memory(c: GpuCheck, available: int | None = None) -> None:
    """On a host whose jax runs on the CPU, a check whose model cannot fit in the memory
    available is refused in one line before it is built (twenty-fifth probe B4: the 8B default
    on a CPU host printed nothing for three minutes and was killed by the kernel's
    out-of-memory killer). Counted: the bf16 weights twice (the model and the step's copies),
    a floor of what the check holds."""
    from emit_jax.errors import ConfigError

    if jax.default_backend() != "cpu":
        return
    available = _available_memory() if available is None else available
    if not available:
        return
    from flax import nnx

    from emit_jax.models.internvl import InternVL

    model = nnx.eval_shape(lambda: InternVL(_model_config(c), rngs=nnx.Rngs(0)))
    weights = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    weights *= 2  # bf16 (EMIT's own modules: a few MB more)
    if 2 * weights > available:
        raise ConfigError(
            f"--arch {c.arch}: needs at least {2 * weights / 2**30:.1f} GiB of host memory "
            f"(its bf16 weights, {weights / 2**30:.1f} GiB, twice: the model and the step's "
            f"copies), and this host, where jax runs on the CPU (no accelerator), has "
            f"{available / 2**30:.1f} GiB available; on a CPU run the check small (--arch tiny, "
            "as the tests do), or on a GPU")


def _available_memory() -> int | None:
    """The host memory available now (``MemAvailable``), else its physical size; None where
    the system says neither."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    from emit_jax.training.validate import host_memory_bytes

    return host_memory_bytes()

