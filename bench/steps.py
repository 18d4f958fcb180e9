"""``python -m bench {matmul,rollout,grpo_step,train_step}``: the sampler, a GRPO step as the
peers time it, and an SFT step's MFU against this machine's matmul peak (optionally profiled:
:func:`trace_summary`), on a freshly initialised model of ``--arch``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp


def _device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind} x{jax.device_count()}"


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _timed(fn, repeats: int):
    """(first call s, [steady call s]): ``fn()`` must block on its outputs."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, times


def _model(arch: str, seed: int = 0):
    from flax import nnx

    from emit_jax.models import architectures
    from emit_jax.models.internvl import InternVL

    return InternVL(architectures.get_config(arch), rngs=nnx.Rngs(seed))


def _prompts(batch: int, length: int, vocab: int, seed: int = 0):
    import numpy as np

    rs = np.random.RandomState(seed)
    ids = rs.randint(0, vocab - 3, size=(batch, length)).astype(np.int32)
    return jnp.asarray(ids), jnp.ones((batch, length), jnp.int32)


def bench_matmul(n: int = 2048, repeats: int = 10) -> dict:
    """This machine's fp32 matmul peak: the best of ``repeats`` ``[n, n] @ [n, n]``."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    _, times = _timed(lambda: f(a, a).block_until_ready(), repeats)
    return {"bench": "matmul", "n": n, "peak_gflops": 2 * n ** 3 / min(times) / 1e9,
            "device": _device()}


def _lora_policy(model, ids, mask, rank: int):
    """``model``'s LoRA policy on the LLM's linears (EMIT's targets, alpha 4 x rank) with
    non-zero B factors (as after some training: the adapters change the outputs)."""
    import numpy as np
    import qwix
    from flax import nnx

    from emit_jax.configs.grpo import LORA_TARGETS
    from emit_jax.training.config import LoRAConfig
    from emit_jax.training.lora import LORA_METHODS, lora_provider

    cfg = LoRAConfig(rank=rank, alpha=4.0 * rank, targets=LORA_TARGETS)
    policy = qwix.apply_lora_to_model(model, lora_provider(cfg), ids[:1], None, mask[:1],
                                      rngs=nnx.Rngs(0), methods=LORA_METHODS)
    policy._emit_lora_scale = cfg.scale
    rs = np.random.RandomState(0)
    for path, v in nnx.to_flat_state(nnx.state(policy, nnx.LoRAParam)):
        if path[-1].endswith("_lora_b"):
            v.set_value(jnp.asarray(1e-3 * rs.randn(*v.get_value().shape), v.get_value().dtype))
    return policy


def _sampler(policy, reference, merge: str):
    """What GRPO's rollout samples from under ``grpo.sampler.merge_lora = merge``: the policy,
    or its merged copy (made now, as once per step)."""
    from emit_jax.training.config import GRPOConfig, SamplerConfig
    from emit_jax.training.grpo import merges_lora
    from emit_jax.training.lora import merged_model

    g = GRPOConfig(sampler=SamplerConfig(merge_lora=merge))
    if reference is None or not merges_lora(policy, g):
        return policy
    model = merged_model(policy, reference)
    model.eval()
    return model


def bench_rollout(arch: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                  lora: int = 0, merges=("float32",)) -> dict:
    """The sampler, ``repeats`` calls after a compiling one. ``lora`` = rank > 0 samples a LoRA
    policy, merged (the merge timed in each call, as once per GRPO step) or not, per
    ``grpo.sampler.merge_lora`` value of ``merges`` (several: timed alternately)."""
    from flax import nnx

    from emit_jax.ops.sampling import generate

    model = _model(arch)
    model.eval()
    ids, mask = _prompts(batch, prompt_len, model.config.text.vocab_size)
    policy = _lora_policy(model, ids, mask, lora) if lora else model
    policy.eval()
    keys = iter(jax.random.split(jax.random.key(0), (repeats + 1) * len(merges)))

    def call(merge) -> tuple[float, float]:
        """(seconds to make the sampler's model, seconds to sample)."""
        t0 = time.perf_counter()
        sampler = _sampler(policy, model if lora else None, merge)
        jax.block_until_ready(jax.tree.leaves(nnx.state(sampler)))
        t1 = time.perf_counter()
        out = generate(sampler, ids, mask, max_new_tokens=new_tokens, eos_token_id=None,
                       temperature=1.0, top_k=0, top_p=1.0, rng=next(keys))
        jax.block_until_ready(out.tokens)
        assert out.tokens.shape == (batch, new_tokens)
        return t1 - t0, time.perf_counter() - t1
    times = {m: [] for m in merges}
    for _ in range(repeats + 1):
        for m in merges:
            times[m].append(call(m))
    rows = {m: _rollout_fields([a + b for a, b in times[m]], [a for a, _ in times[m][1:]],
                               batch * new_tokens) for m in merges}
    return {"bench": "rollout", "arch": arch, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "lora_rank": lora, **_variants(rows, "merge_lora", lora),
            "device": _device()}


def _rollout_fields(totals: list[float], merges: list[float], tokens: int) -> dict:
    """A rollout variant's fields from its calls' seconds (the first compiles) and the part of
    the timed calls spent making the sampler's model (the LoRA merge)."""
    med = _median(totals[1:])
    return {"new_tokens_per_s": tokens / med, "s_per_call_median": med,
            "s_per_call_all": totals[1:], "first_call_s": totals[0],
            "merge_s_median": _median(merges)}


def _variants(rows: dict, key: str, named: bool = True) -> dict:
    """A bench row's fields for its variants ``rows`` (``{name: fields}``, timed alternately):
    the last one's at the top (``key``: its name, when ``named``), and all under ``variants``
    when there are several."""
    name, last = list(rows.items())[-1]
    return {**({key: name} if named else {}), **last,
            **({"variants": rows} if len(rows) > 1 else {})}


#: ``--compare``'s two GRPO samplers: today's (LoRA unmerged, resampling rounds of all prompts)
#: and the new defaults
SAMPLERS = {"today": ("never", "full"), "new": ("float32", "pow2")}


def bench_grpo_step(arch: str, prompts: int, G: int, prompt_len: int, new_tokens: int,
                    steps: int, beta: float = 0.01, lora: int = 0, resample_groups: int = 0,
                    samplers=("new",), passes=("shared",)) -> dict:
    """The peers' GRPO step (TRL / Tunix in ../shared/bench): full fine-tuning, separate
    reference, reward ``(sum of the completion's tokens) % 7`` (theirs: text length % 7).
    ``lora`` = rank > 0: a LoRA policy over the model instead (the model is the reference).
    ``resample_groups`` = K > 0: each step also regenerates K groups, as a resampling round.
    ``samplers``: names in :data:`SAMPLERS`; ``passes``: how the reference pass and the update
    run the prompts, ``"full"`` (every one of the G rows in full) or ``"shared"`` (each prompt
    once into a KV cache the group attends to: ``make_grpo_fns(shared_prompts=True)``). Several
    of either: every combination, their steps alternating."""
    import numpy as np
    import optax
    from flax import nnx

    from emit_jax.training.config import GRPOConfig
    from emit_jax.training.grpo import make_grpo_fns
    from emit_jax.training.lora import trainable_filter

    model = _model(arch)
    model.eval()
    vocab = model.config.text.vocab_size
    if lora:
        ids, mask = _prompts(1, prompt_len, vocab)
        policy, reference, wrt = _lora_policy(model, ids, mask, lora), model, trainable_filter()
    else:  # an identical, separate reference (as the peers keep one)
        policy, reference, wrt = model, _model(arch), nnx.Param
    policy.eval(), reference.eval()
    g = GRPOConfig(beta=beta, eps_low=0.2, eps_high=0.2, kl="k3", agg="token_mean", iterations=1)
    opt = nnx.Optimizer(policy, optax.chain(optax.clip_by_global_norm(1.0),
                                            optax.adamw(1e-5, weight_decay=0.0)), wrt=wrt)
    g = dataclasses.replace(g, G=G)
    fns = {p: make_grpo_fns(g, wrt, shared_prompts=p == "shared") for p in passes}
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(policy, wrt))[:4]]
    combos = [(s, p) for s in samplers for p in passes]

    def name(s, p):
        return s if len(passes) == 1 else p if len(samplers) == 1 else f"{s}+{p}"
    runs = {name(s, p): [] for s, p in combos}
    for step in range(steps + 1):
        for s, p in combos:
            runs[name(s, p)].append(_grpo_step(
                policy, reference, bool(lora), opt, fns[p], step, prompts, G, prompt_len,
                new_tokens, vocab, resample_groups, *SAMPLERS[s], shared=p == "shared"))
    moved = any(not np.array_equal(a, np.asarray(c)) for a, c in
                zip(before, jax.tree.leaves(nnx.state(policy, wrt))[:4]))
    rows = {n: _step_fields(r, prompts) for n, r in runs.items()}
    key = "sampler" if len(passes) == 1 else "passes" if len(samplers) == 1 else "variant"
    return {"bench": "grpo_step", "arch": arch, "prompts": prompts, "G": G,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "beta": beta, "lora_rank": lora,
            "resample_groups": resample_groups,
            **({"passes": passes[0]} if len(passes) == 1 else {}), **_variants(rows, key),
            "params_moved": moved, "device": _device()}


def _step_fields(runs: list[dict], prompts: int) -> dict:
    """The row fields of one sampler's steps (the first compiles)."""
    done = runs[1:]
    return {"s_per_step_median": _median([r["total"] for r in done]),
            "s_per_step_all": [r["total"] for r in done], "first_step_s": runs[0]["total"],
            "phase_s_median": {k: _median([r["phases"][k] for r in done])
                               for k in done[0]["phases"]},
            "resample_rows": runs[0]["resample_rows"],
            "groups_with_reward_spread": f"{sum(r['spread'] for r in runs)}/"
                                         f"{prompts * len(runs)}",
            "loss_last": runs[-1]["loss"]}


def _grpo_step(policy, reference, lora: bool, opt, fns, step: int, prompts: int, G: int,
               prompt_len: int, new_tokens: int, vocab: int, resample_groups: int, merge: str,
               pad: str, shared: bool = False) -> dict:
    """One timed GRPO step of :func:`bench_grpo_step`: (the LoRA merge), generate, (a
    resampling round of ``resample_groups`` groups padded by ``pad``), reference log-probs,
    rewards, update."""
    import numpy as np
    from flax import nnx

    from emit_jax.ops.sampling import generate
    from emit_jax.rl import grpo as G_
    from emit_jax.training.grpo import round_size

    score, train_step = fns
    t0 = last = time.perf_counter()
    phases = {}

    def lap(name):
        nonlocal last
        now = time.perf_counter()
        phases[name], last = now - last, now
    sampler = _sampler(policy, reference if lora else None, merge)
    if lora:
        jax.block_until_ready(jax.tree.leaves(nnx.state(sampler)))
        lap("merge")
    one, one_mask = _prompts(prompts, prompt_len, vocab, seed=step)
    ids, mask = jnp.repeat(one, G, 0), jnp.repeat(one_mask, G, 0)
    kw = dict(max_new_tokens=new_tokens, eos_token_id=None, temperature=1.0, top_k=0, top_p=1.0)
    toks = jax.block_until_ready(generate(sampler, ids, mask, rng=jax.random.key(step),
                                          **kw).tokens)
    lap("generate")
    rows = round_size(resample_groups, prompts, pad) * G if resample_groups else 0
    if rows:
        again = generate(sampler, ids[:rows], mask[:rows], rng=jax.random.key(10_000 + step), **kw)
        toks = jax.block_until_ready(toks.at[:resample_groups * G].set(
            again.tokens[:resample_groups * G]))
        lap("resample")
    del sampler
    b = {"input_ids": one if shared else ids, "attention_mask": one_mask if shared else mask,
         "pixel_values": None}
    cmask = jnp.ones_like(toks)
    ref, old = score(policy, reference, b, toks, cmask)
    jax.block_until_ready(ref)
    lap("ref_logprobs")
    rewards = (np.asarray(toks).sum(1) % 7).astype(np.float32)
    spread = int(sum(len(set(rewards[i:i + G])) > 1 for i in range(0, len(rewards), G)))
    adv = G_.group_advantages(jnp.asarray(rewards), G)
    lap("rewards")
    loss, _, _ = train_step(policy, opt, b, toks, cmask, adv, ref, old)
    jax.block_until_ready(jax.tree.leaves(nnx.state(policy, nnx.Param)))
    lap("update")
    return {"phases": phases, "total": last - t0,
            "loss": float(loss), "spread": spread, "resample_rows": rows}


def _xla_flops_fwd_bwd(model, b) -> float | None:
    """XLA's FLOP count of the compiled forward + backward pass (the optimizer's elementwise
    update is negligible next to it)."""
    from flax import nnx

    from emit_jax.training.sft import sft_loss

    graphdef, state = nnx.split(model)

    def grads(state, b):
        m = nnx.merge(graphdef, state)
        return nnx.grad(lambda m: sft_loss(m, b)[0])(m)
    try:
        cost = jax.jit(grads).lower(state, b).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None


def trace_summary(call, steps: int = 2, top: int = 12) -> dict:
    """Run ``call()`` ``steps`` times under ``jax.profiler`` and summarise the trace per step:
    wall time, the busy time of each XLA:CPU worker thread (``ThunkExecutor::Execute`` events;
    busy / wall is how well the step keeps the cores fed) and the ``top`` XLA ops by time.
    Needs ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` for per-op events (set by
    ``--profile`` before JAX starts)."""
    import collections
    import glob
    import tempfile

    from jax._src.lib import _profile_data  # JAX's own reader of the XSpace it writes

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t = time.perf_counter()
        for _ in range(steps):
            call()
        wall = time.perf_counter() - t
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no trace under {d}")
        pdata = _profile_data.ProfileData.from_file(files[0])
    busy: dict[str, float] = collections.Counter()
    ops: dict[str, float] = collections.Counter()
    for plane in pdata.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                ms = ev.duration_ns / 1e6 / steps
                if ev.name == "ThunkExecutor::Execute":
                    busy[line.name] += ms
                elif "ThunkExecutor" not in ev.name and "ThreadPool" not in ev.name:
                    ops[ev.name] += ms
    wall_ms = 1000 * wall / steps
    return {"wall_ms_per_step": wall_ms,
            "thread_busy_ms_per_step": {k: round(v, 1) for k, v in sorted(busy.items())},
            # over the worker pool's threads (the client thread only hands work over)
            "thread_busy_fraction": round(sum(v for k, v in busy.items() if "Eigen" in k)
                                          / max(sum("Eigen" in k for k in busy), 1) / wall_ms, 3),
            "top_ops_ms_per_step": {k: round(v, 1) for k, v in ops.most_common(top)}}


def bench_train_step(arch: str, batch: int, seq_len: int, repeats: int, peak: float | None,
                     profile: bool = False) -> dict:
    import numpy as np
    from flax import nnx

    from emit_jax.models.layers import count_params
    from emit_jax.training.config import OptimConfig
    from emit_jax.training.optim import make_optimizer
    from emit_jax.training.sft import make_train_step, to_device

    model = _model(arch)
    model.train()
    opt = nnx.Optimizer(model, make_optimizer(OptimConfig(steps=1000, lr=1e-4)), wrt=nnx.Param)
    ids, mask = _prompts(batch, seq_len, model.config.text.vocab_size)
    labels = np.asarray(ids).copy()
    labels[:, 0] = -100  # every later token is a label
    b = to_device({"input_ids": np.asarray(ids), "labels": labels,
                   "attention_mask": np.asarray(mask)})
    step = make_train_step(nnx.Param)

    def call():
        out = step(model, opt, b)
        jax.block_until_ready(out)
    first, times = _timed(call, repeats)
    med = _median(times)
    n_text = count_params(nnx.state(model.language_model, nnx.Param))
    tokens = batch * seq_len
    flops_6nd = 6 * n_text * tokens
    xla_flops = _xla_flops_fwd_bwd(model, b)
    peak = peak if peak is not None else bench_matmul()["peak_gflops"]
    achieved = flops_6nd / med / 1e9
    prof = {"profile": trace_summary(call)} if profile else {}
    return {"bench": "train_step", "arch": arch, "batch": batch, "seq_len": seq_len,
            **prof, "s_per_step_median": med, "first_call_s": first, "tokens_per_s": tokens / med,
            "llm_params": n_text, "flops_6nt": flops_6nd, "xla_flops": xla_flops,
            "achieved_gflops": achieved, "peak_gflops": peak, "mfu": achieved / peak,
            "achieved_gflops_xla": xla_flops / med / 1e9 if xla_flops else None,
            "mfu_xla": xla_flops / med / 1e9 / peak if xla_flops else None,
            "device": _device()}
