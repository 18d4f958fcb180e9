"""``python -m bench {matmul,rollout,grpo_step,train_step}``: the sampler, a GRPO step as the
peers time it, and an SFT step's MFU against this machine's matmul peak (optionally profiled:
:func:`trace_summary`), on a freshly initialised model of ``--arch``.
"""

from __future__ import annotations

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


def bench_rollout(arch: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    from emit_jax.ops.sampling import generate

    model = _model(arch)
    model.eval()
    ids, mask = _prompts(batch, prompt_len, model.config.text.vocab_size)
    keys = iter(jax.random.split(jax.random.key(0), repeats + 1))

    def call():
        out = generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=None,
                       temperature=1.0, top_k=0, top_p=1.0, rng=next(keys))
        jax.block_until_ready(out.tokens)
        assert out.tokens.shape == (batch, new_tokens)
    first, times = _timed(call, repeats)
    med = _median(times)
    return {"bench": "rollout", "arch": arch, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "new_tokens_per_s": batch * new_tokens / med,
            "s_per_call_median": med, "s_per_call_all": times, "first_call_s": first,
            "device": _device()}


def bench_grpo_step(arch: str, prompts: int, G: int, prompt_len: int, new_tokens: int,
                    steps: int, beta: float = 0.01) -> dict:
    """The peers' GRPO step (TRL / Tunix in ../shared/bench): full fine-tuning, separate
    reference, reward ``(sum of the completion's tokens) % 7`` (theirs: text length % 7)."""
    import numpy as np
    import optax
    from flax import nnx

    from emit_jax.ops.sampling import generate
    from emit_jax.rl import grpo as G_
    from emit_jax.training.config import GRPOConfig
    from emit_jax.training.grpo import make_grpo_fns

    policy = _model(arch)
    reference = _model(arch)  # an identical, separate copy (as the peers keep one)
    policy.eval(), reference.eval()
    g = GRPOConfig(beta=beta, eps_low=0.2, eps_high=0.2, kl="k3", agg="token_mean", iterations=1)
    opt = nnx.Optimizer(policy, optax.chain(optax.clip_by_global_norm(1.0),
                                            optax.adamw(1e-5, weight_decay=0.0)), wrt=nnx.Param)
    score, train_step = make_grpo_fns(g, nnx.Param)
    vocab = policy.config.text.vocab_size
    phases: dict[str, list[float]] = {"generate": [], "ref_logprobs": [], "rewards": [],
                                      "update": []}
    totals = []
    spread = 0
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(policy, nnx.Param))[:4]]
    for step in range(steps + 1):
        t0 = time.perf_counter()
        ids, mask = _prompts(prompts, prompt_len, vocab, seed=step)
        ids, mask = jnp.repeat(ids, G, 0), jnp.repeat(mask, G, 0)
        out = generate(policy, ids, mask, max_new_tokens=new_tokens, eos_token_id=None,
                       temperature=1.0, top_k=0, top_p=1.0, rng=jax.random.key(step))
        toks = jax.block_until_ready(out.tokens)
        t1 = time.perf_counter()
        b = {"input_ids": ids, "attention_mask": mask, "pixel_values": None}
        cmask = jnp.ones_like(toks)
        ref, old = score(policy, reference, b, toks, cmask)
        jax.block_until_ready(ref)
        t2 = time.perf_counter()
        rewards = (np.asarray(toks).sum(1) % 7).astype(np.float32)
        spread += int(sum(len(set(rewards[i:i + G])) > 1 for i in range(0, len(rewards), G)))
        adv = G_.group_advantages(jnp.asarray(rewards), G)
        t3 = time.perf_counter()
        loss, _, _ = train_step(policy, opt, b, toks, cmask, adv, ref, old)
        jax.block_until_ready(jax.tree.leaves(nnx.state(policy, nnx.Param)))
        t4 = time.perf_counter()
        if step:  # step 0 compiles
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k].append(dt)
            totals.append(t4 - t0)
        else:
            first = t4 - t0
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(policy, nnx.Param))[:4]]
    return {"bench": "grpo_step", "arch": arch, "prompts": prompts, "G": G,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "beta": beta,
            "s_per_step_median": _median(totals), "s_per_step_all": totals, "first_step_s": first,
            "phase_s_median": {k: _median(v) for k, v in phases.items()},
            "groups_with_reward_spread": f"{spread}/{prompts * (steps + 1)}",
            "loss_last": float(loss),
            "params_moved": any(not np.array_equal(a, c) for a, c in zip(before, after)),
            "device": _device()}


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
