"""``python -m bench {heatmap,rollout,grpo_step,train_step,matmul,gpu,compare} [--arch ...]``

Benchmarks (scripts, not tests, and not part of the ``emit_jax`` package: run them from the
repository root); one JSON object per line.

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
- ``gpu``: the prepared accelerator check (``bench/gpucheck.py``): an InternVL3-8B-shaped EMIT
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
(a script of its own: ``emit_jax`` imports no torch) times the peers' PyTorch version at the
same shape in float32 or bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from emit_jax.ops.heatmap import STRATEGIES as HEATMAP_STRATEGIES

from . import gpucheck
from .compare import compare
from .heatmap import _native_heatmap, bench_heatmap
from .steps import bench_grpo_step, bench_matmul, bench_rollout, bench_train_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
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
