"""``python -m emit_jax.bench {heatmap,rollout,grpo_step,train_step,matmul,compare} [--arch ...]``

Benchmarks (scripts, not tests); one JSON object per line.

- ``rollout``: the jitted sampler (prefill + ``while_loop`` decode over a preallocated KV cache),
  ``--batch`` 16 prompts of ``--prompt-len`` 128 random tokens, exactly ``--new-tokens`` 128
  sampled tokens each (no EOS), temperature 1; new tokens/s (median over ``--repeats``).
- ``grpo_step``: one GRPO step as the peers time it (``--prompts`` 2 x ``--G`` 8, 128 / 128
  tokens, beta 0.01, full fine-tuning with AdamW 1e-5 and a separate frozen reference):
  generation, reference log-probs, rewards + advantages, loss + update; seconds per step and per
  phase (each phase waits for its outputs).
- ``train_step``: one SFT step (cross-entropy on every token, AdamW) on ``--batch`` x
  ``--seq-len`` tokens; achieved FLOP/s (XLA's count of the compiled step, and 6 N T) against
  this machine's measured matmul peak (``matmul``), i.e. MFU. ``--profile`` also traces two
  steps (:func:`trace_summary`: worker-thread busy time, the top XLA ops).
- ``gpu``: the prepared accelerator check (``emit_jax.gpucheck``): an InternVL3-8B-shaped EMIT
  model with random bf16 weights, one SFT step and one GRPO step with the 8B config's settings
  at a batch that fits one chip; step time, MFU, peak memory against the plan and the compiler.
- ``compare``: ours and the peers of ``../shared/bench`` (transformers ``generate``, TRL
  ``GRPOTrainer``, Tunix's sampler and GRPO learner, the PyTorch heat maps), run alternately
  for ``--rounds`` rounds, each in its own process (the peers in their own virtualenvs, named by
  ``--python-hf`` / ``--python-tunix``); prints the medians and our speed-up per workload.
- ``heatmap`` times :func:`emit_jax.ops.heatmap.anomaly_map` at
an architecture's real CE shape (InternVL3-8B: 4 layers, 32 x 32 patches, D 1024, 4 rotations,
window 6) on random features, and reports milliseconds per sample and the achieved GFLOP/s of
the similarity products the strategy executes (``window_gflop``: the products inside the window
clipped at the grid's edges, the least any exact method must do). ``bench/torch_heatmap.py``
(outside the package, which imports no torch) times the peers' PyTorch version at the same
shape in float32 or bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from emit_jax.ops.heatmap import STRATEGIES as HEATMAP_STRATEGIES


def _heatmap_shape(arch: str, grid: int | None = None,
                   window: int | None = None) -> tuple[int, int, int, int, int]:
    """(layers, grid, dim, rotations, window) of an architecture's CE heat map; ``grid`` /
    ``window`` override the patch grid's side and the half-window (by default the window EMIT
    uses at that grid: 6 at 32, scaled with the grid)."""
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMITConfig

    v = architectures.get_config(arch).vision
    ecfg = EMITConfig()
    g = grid or v.grid
    return (len(ecfg.layers_for(v.num_hidden_layers)), g, v.hidden_size, ecfg.rotations,
            ecfg.window_for(g) if window is None else window)


def _native_heatmap() -> bool:
    """The native heat-map kernel builds here (else ``--strategy all`` leaves ``fused`` out and
    says why on stderr)."""
    from emit_jax.ops import native

    if native.load() is None:
        print(f"bench heatmap: no 'fused' row: {native.unavailable_reason()}", file=sys.stderr)
        return False
    return True


def bench_heatmap(arch: str, strategy: str, batch: int, repeats: int, dtype: str,
                  grid: int | None = None, window: int | None = None) -> dict:
    from emit_jax.ops.heatmap import anomaly_map, flops, resolve_strategy, window_flops

    L, g, d, R, k = _heatmap_shape(arch, grid, window)
    kq, kr = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (L, batch, g, g, d), jnp.float32).astype(dtype)
    r = jax.random.normal(kr, (L, batch, R, g, g, d), jnp.float32).astype(dtype)
    chosen = resolve_strategy(strategy, g, g, k)
    anomaly_map(q, r, k, True, chosen).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        anomaly_map(q, r, k, True, chosen).block_until_ready()
        times.append(time.perf_counter() - t)
    best = min(times)
    executed = flops(L, batch, R, g, g, d, k, chosen)
    window_only = window_flops(L, batch, R, g, g, d, k)
    return {
        "bench": "heatmap", "arch": arch, "strategy": chosen, "dtype": dtype,
        "shape": {"layers": L, "batch": batch, "rotations": R, "grid": g, "dim": d, "window": k},
        "ms_per_sample": 1000 * best / batch, "ms_median_per_sample": 1000 * sorted(times)[len(times) // 2] / batch,
        "gflop_executed": executed / 1e9, "window_gflop": window_only / 1e9,
        "achieved_gflops": executed / best / 1e9,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "host": platform.processor() or platform.machine(), "repeats": repeats,
    }


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
    import ml_collections
    import numpy as np
    import optax
    from flax import nnx

    from emit_jax.ops.sampling import generate
    from emit_jax.rl import grpo as G_
    from emit_jax.training.grpo import make_grpo_fns

    policy = _model(arch)
    reference = _model(arch)  # an identical, separate copy (as the peers keep one)
    policy.eval(), reference.eval()
    g = ml_collections.ConfigDict(dict(beta=beta, eps_low=0.2, eps_high=0.2, kl="k3",
                                       agg="token_mean", iterations=1))
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
    from emit_jax.training.sft import OptimConfig, make_optimizer, make_train_step, to_device

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


PEER_MODEL = ["512", "8", "8", "2", "1376", "32000"]  # hidden layers heads kv_heads mlp vocab


def _run_json(cmd: list[str], env: dict | None = None, timeout: int = 3600) -> dict | None:
    """Run ``cmd``; its last stdout line parsed as JSON (None, with the error on stderr, when it
    fails)."""
    import os
    import subprocess

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or not lines:
        print(f"compare: {' '.join(cmd[:3])} ... failed ({r.returncode}): "
              f"{r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else ''}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def compare(peers_dir: str, python_hf: str | None, python_tunix: str | None, rounds: int,
            workloads: list[str]) -> list[dict]:
    """Alternate ours and each peer per workload; medians over ``rounds`` and the ratios."""
    import os

    me = [sys.executable, "-m", "emit_jax.bench"]
    peer = lambda name: os.path.join(peers_dir, name)  # noqa: E731
    jobs: dict[str, list[tuple[str, list[str], dict, str, bool]]] = {
        # (who, command, env, metric, higher is better)
        "rollout": [("emit_jax", me + ["rollout"], {}, "new_tokens_per_s", True)],
        "grpo_step": [("emit_jax", me + ["grpo_step"], {}, "s_per_step_median", False)],
        "heatmap": [("emit_jax", me + ["heatmap", "--arch", "internvl3_8b"], {}, "ms_per_sample",
                     False)],
    }
    if python_hf:
        jobs["rollout"].append(("transformers", [python_hf, peer("peer_hf_generate.py"),
                                                 *PEER_MODEL, "16", "128", "128"], {},
                                "new_tokens_per_s", True))
        jobs["grpo_step"].append(("trl", [python_hf, peer("peer_trl_grpo.py"), *PEER_MODEL, "2",
                                          "8", "128", "128", "4"], {}, "s_per_step_median", False))
        jobs["heatmap"].append(("torch_matmul", [python_hf, peer("matmul_heatmap_torch.py")], {},
                                "ms_per_sample", False))
    if python_tunix:
        jobs["rollout"].append(("tunix", [python_tunix, peer("peer_tunix_grpo.py")],
                                {"PEER_WORKLOAD": "sampler"}, "new_tokens_per_s", True))
        jobs["grpo_step"].append(("tunix", [python_tunix, peer("peer_tunix_grpo.py")],
                                  {"PEER_WORKLOAD": "grpo"}, "s_per_step_median", False))
    rows = []
    for workload in workloads:
        values: dict[str, list[float]] = {}
        for _ in range(rounds):
            for who, cmd, env, metric, _ in jobs[workload]:
                out = _run_json(cmd, env)
                if out is not None and metric in out:
                    values.setdefault(who, []).append(float(out[metric]))
        ours = values.get("emit_jax")
        for who, _, _, metric, higher in jobs[workload]:
            if who not in values:
                continue
            med = _median(values[who])
            row = {"workload": workload, "impl": who, "metric": metric, "median": med,
                   "values": values[who]}
            if ours and who != "emit_jax":
                row["emit_jax_speedup"] = (_median(ours) / med) if higher else (med / _median(ours))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emit_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("heatmap")
    h.add_argument("--arch", default="internvl3_8b")
    h.add_argument("--strategy", default="auto", choices=[*HEATMAP_STRATEGIES, "all"])
    h.add_argument("--grid", type=int, default=None, help="patch grid side (default: the arch's)")
    h.add_argument("--window", type=int, default=None,
                   help="half-window (default: EMIT's at that grid, 6 at 32)")
    h.add_argument("--batch", type=int, default=1)
    h.add_argument("--repeats", type=int, default=5)
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    h.add_argument("--json", action="store_true", help="one JSON object per line (default: also JSON)")
    r = sub.add_parser("rollout")
    r.add_argument("--arch", default="small")
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--prompt-len", type=int, default=128)
    r.add_argument("--new-tokens", type=int, default=128)
    r.add_argument("--repeats", type=int, default=5)
    gs = sub.add_parser("grpo_step")
    gs.add_argument("--arch", default="small")
    gs.add_argument("--prompts", type=int, default=2)
    gs.add_argument("--G", type=int, default=8)
    gs.add_argument("--prompt-len", type=int, default=128)
    gs.add_argument("--new-tokens", type=int, default=128)
    gs.add_argument("--steps", type=int, default=4, help="timed steps after the compiling one")
    t = sub.add_parser("train_step")
    t.add_argument("--arch", default="small")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--peak-gflops", type=float, default=None,
                   help="the matmul peak to divide by (default: measured now)")
    t.add_argument("--profile", action="store_true",
                   help="also trace 2 steps: worker-thread busy time and the top XLA ops")
    m = sub.add_parser("matmul")
    m.add_argument("--n", type=int, default=2048)
    m.add_argument("--repeats", type=int, default=10)
    gp = sub.add_parser("gpu")
    from emit_jax import gpucheck

    gpucheck.add_arguments(gp)
    c = sub.add_parser("compare")
    c.add_argument("--peers-dir", default="../shared/bench")
    c.add_argument("--python-hf", default=None,
                   help="python of a virtualenv with torch, transformers, trl, datasets")
    c.add_argument("--python-tunix", default=None, help="python of a virtualenv with google-tunix")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--workloads", default="rollout,grpo_step,heatmap")
    for q in (r, gs, t, m, c, gp):
        q.add_argument("--json", action="store_true", help="one JSON object per line (the default)")
    args = p.parse_args(argv)
    if getattr(args, "profile", False):  # per-op trace events; read when XLA:CPU starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_enable_xprof_traceme=true").strip()
    if args.what == "heatmap":
        strategies = ([s for s in HEATMAP_STRATEGIES if s != "auto"] if args.strategy == "all"
                      else [args.strategy])
        if args.strategy == "all" and not _native_heatmap():
            strategies.remove("fused")
        rows = [bench_heatmap(args.arch, s, args.batch, args.repeats, args.dtype, args.grid,
                              args.window) for s in strategies]
    elif args.what == "rollout":
        rows = [bench_rollout(args.arch, args.batch, args.prompt_len, args.new_tokens, args.repeats)]
    elif args.what == "grpo_step":
        rows = [bench_grpo_step(args.arch, args.prompts, args.G, args.prompt_len, args.new_tokens,
                                args.steps)]
    elif args.what == "train_step":
        rows = [bench_train_step(args.arch, args.batch, args.seq_len, args.repeats, args.peak_gflops,
                                 args.profile)]
    elif args.what == "matmul":
        rows = [bench_matmul(args.n, args.repeats)]
    elif args.what == "gpu":
        import tempfile

        if not jax.config.jax_compilation_cache_dir:  # the compiler's figures cost no 2nd compile
            jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="emit_gpu_xla"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        rows = [gpucheck.run(gpucheck.from_args(args))]
    else:
        rows = compare(args.peers_dir, args.python_hf, args.python_tunix, args.rounds,
                       [w for w in args.workloads.split(",") if w])
        for row in rows:
            ratio = f"  emit_jax x{row['emit_jax_speedup']:.2f}" if "emit_jax_speedup" in row else ""
            print(f"{row['workload']:10s} {row['impl']:14s} {row['metric']:18s} "
                  f"{row['median']:12.4g}{ratio}", file=sys.stderr)
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
