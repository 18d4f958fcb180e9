"""``python -m bench {heatmap,rollout,grpo_step,train_step,matmul,gpu,compare,compile_time} ...``

Benchmarks (scripts, not tests, and not part of the ``emit_jax`` package: run them from the
repository root); one JSON object per line.

- ``rollout``: the jitted sampler (prefill + ``while_loop`` decode over a preallocated KV cache),
  ``--batch`` 16 prompts of ``--prompt-len`` 128 random tokens, exactly ``--new-tokens`` 128
  sampled tokens each (no EOS), temperature 1; new tokens/s (median over ``--repeats``).
  ``--lora R``: a LoRA policy of rank R, sampled merged (``--merge-lora``, the merge timed in
  each call) or not; ``--compare`` alternates unmerged and merged (``variants`` in the row).
- ``grpo_step``: one GRPO step as the peers time it (``--prompts`` 2 x ``--G`` 8, 128 / 128
  tokens, beta 0.01, full fine-tuning with AdamW 1e-5 and a separate frozen reference):
  generation, reference log-probs, rewards + advantages, loss + update; seconds per step and per
  phase (each phase waits for its outputs). ``--lora R`` trains a LoRA policy instead (the model
  its reference), ``--resample-groups K`` adds a resampling round of K groups a step, and
  ``--sampler today|new`` / ``--compare`` (both, step by step) choose GRPO's sampler settings
  (``grpo.sampler``: LoRA merged once per step, rounds padded to a power of two).
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
- ``compile_time``: seconds to trace and compile one training step at full depth (28 decoder
  layers, 24 ViT blocks, narrow widths) with the layers unrolled and stacked under ``lax.scan``
  (``scan_layers``), ``--remat`` optionally (``bench/compile_time.py``).
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
import dataclasses
import json
import os
import sys

if __name__ == "__main__":  # before jax loads: a Ctrl-C meanwhile is one line too, exit 130
    from emit_jax.cli import check_jax_environment, closed_stderr, interrupt_early

    closed_stderr()  # 2>&-: its lines go nowhere, not to standard output
    interrupt_early("python -m bench")
    check_jax_environment("python -m bench")  # a JAX_* value JAX refuses: one line

import jax

from emit_jax import cli
from emit_jax.errors import ConfigError
from emit_jax.limits import MAX_BATCH, MAX_GRID, MAX_LAYERS
from emit_jax.models.architectures import ARCHITECTURES
from emit_jax.ops.heatmap import STRATEGIES as HEATMAP_STRATEGIES

from . import gpucheck
from .compare import WORKLOADS, compare, peer_scripts
from .compile_time import bench_compile_time
from .heatmap import _native_heatmap, bench_heatmap
from emit_jax.training.config import MERGE_LORA

from .steps import SAMPLERS, bench_grpo_step, bench_matmul, bench_rollout, bench_train_step


PROG = "python -m bench"
#: where ``compare`` looks for the peers' scripts unless ``--peers-dir`` says
PEERS_DIR = "../shared/bench"
ARCHS = sorted(ARCHITECTURES)



def main(argv=None) -> int:
    p = cli.Parser(prog=PROG, description=__doc__, error_type=ConfigError,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("heatmap")
    h.add_argument("--arch", default="internvl3_8b", choices=ARCHS)
    h.add_argument("--strategy", default="auto", choices=[*HEATMAP_STRATEGIES, "all"])
    h.add_argument("--grid", type=cli.int_in(1, MAX_GRID), default=None,
                   help=f"patch grid side, at most {MAX_GRID} (default: the arch's; 32 for "
                   "InternVL3's 448-pixel tiles)")
    h.add_argument("--window", type=cli.nonneg_int, default=None,
                   help="half-window (default: EMIT's at that grid, 6 at 32)")
    h.add_argument("--batch", type=cli.int_in(1, MAX_BATCH), default=1)
    h.add_argument("--repeats", type=cli.int_in(1, cli.MAX_REPEATS), default=5)
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    h.add_argument("--json", action="store_true", help="one JSON object per line (default: also JSON)")
    r = sub.add_parser("rollout")
    r.add_argument("--arch", default="small", choices=ARCHS)
    r.add_argument("--batch", type=cli.int_in(1, MAX_BATCH), default=16)
    r.add_argument("--prompt-len", type=cli.int_in(1, cli.MAX_TOKENS), default=128)
    r.add_argument("--new-tokens", type=cli.int_in(1, cli.MAX_TOKENS), default=128)
    r.add_argument("--repeats", type=cli.int_in(1, cli.MAX_REPEATS), default=5)
    r.add_argument("--lora", type=cli.nonneg_int, default=0, metavar="RANK",
                   help="sample a LoRA policy of this rank (0: the plain model)")
    r.add_argument("--merge-lora", default=None, choices=MERGE_LORA,
                   help="grpo.sampler.merge_lora for the LoRA policy (with --lora; default "
                        "float32)")
    r.add_argument("--compare", action="store_true",
                   help="with --lora: alternate merge_lora 'never' (today) and --merge-lora")
    gs = sub.add_parser("grpo_step")
    gs.add_argument("--arch", default="small", choices=ARCHS)
    gs.add_argument("--prompts", type=cli.int_in(1, MAX_BATCH), default=2)
    gs.add_argument("--G", type=cli.int_in(2, MAX_BATCH), default=8)
    gs.add_argument("--prompt-len", type=cli.int_in(1, cli.MAX_TOKENS), default=128)
    gs.add_argument("--new-tokens", type=cli.int_in(1, cli.MAX_TOKENS), default=128)
    gs.add_argument("--steps", type=cli.positive_int, default=4,
                    help="timed steps after the compiling one")
    gs.add_argument("--lora", type=cli.nonneg_int, default=0, metavar="RANK",
                    help="train a LoRA policy of this rank (0: full fine-tuning, as the peers)")
    gs.add_argument("--resample-groups", type=cli.nonneg_int, default=0, metavar="K",
                    help="also regenerate K groups a step, as a resampling round")
    gs.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                    help="today: LoRA unmerged, resampling rounds padded to all prompts; new: "
                         "the grpo.sampler defaults (merged, padded to a power of two; the "
                         "default)")
    gs.add_argument("--compare", action="store_true",
                    help="alternate the samplers 'today' and 'new', step by step")
    gs.add_argument("--passes", default=None, choices=("full", "shared"),
                    help="the reference pass and the update: every row in full, or each prompt "
                         "once into a KV cache its G completions attend to (the default)")
    gs.add_argument("--compare-passes", action="store_true",
                    help="alternate --passes 'full' and 'shared', step by step")
    t = sub.add_parser("train_step")
    t.add_argument("--arch", default="small", choices=ARCHS)
    t.add_argument("--batch", type=cli.int_in(1, MAX_BATCH), default=8)
    t.add_argument("--seq-len", type=cli.int_in(1, cli.MAX_TOKENS), default=256)
    t.add_argument("--repeats", type=cli.int_in(1, cli.MAX_REPEATS), default=5)
    t.add_argument("--peak-gflops", type=cli.positive_float, default=None,
                   help="the matmul peak to divide by (default: measured now)")
    t.add_argument("--profile", action="store_true",
                   help="also trace 2 steps: worker-thread busy time and the top XLA ops")
    m = sub.add_parser("matmul")
    m.add_argument("--n", type=cli.int_in(1, cli.MAX_MATRIX_SIDE), default=2048)
    m.add_argument("--repeats", type=cli.int_in(1, cli.MAX_REPEATS), default=10)
    gp = sub.add_parser("gpu")
    gpucheck.add_arguments(gp)
    c = sub.add_parser("compare")
    c.add_argument("--peers-dir", default=None,
                   help=f"the peers' benchmark scripts (default {PEERS_DIR})")
    c.add_argument("--python-hf", type=_interpreter, default=None,
                   help="python of a virtualenv with torch, transformers, trl, datasets")
    c.add_argument("--python-tunix", type=_interpreter, default=None, help="python of a virtualenv with google-tunix")
    c.add_argument("--rounds", type=cli.int_in(1, cli.MAX_REPEATS), default=3)
    c.add_argument("--workloads", default="rollout,grpo_step,heatmap")
    ct = sub.add_parser("compile_time")
    ct.add_argument("--arch", default="small", choices=ARCHS)
    ct.add_argument("--text-layers", type=cli.int_in(1, MAX_LAYERS), default=28)
    ct.add_argument("--vit-layers", type=cli.int_in(1, MAX_LAYERS), default=24)
    ct.add_argument("--batch", type=cli.int_in(1, MAX_BATCH), default=2)
    ct.add_argument("--seq-len", type=cli.int_in(1, cli.MAX_TOKENS), default=256)
    ct.add_argument("--remat", action="store_true", help="under memory.remat")
    ct.add_argument("--remat-policy", default=None,
                    help="memory.remat_policy (with --remat; default full)")
    for q in (r, gs, t, m, c, gp, ct):
        q.add_argument("--json", action="store_true", help="one JSON object per line (the default)")
    for q in (r, gs, t, gp):
        q.add_argument("--kernels", nargs="+", default=[""], metavar="K=V,...",
                       help="kernel variants (emit_jax.ops.kernels), e.g. 'attention=einsum,"
                       "decode=full' 'attention=dot_product,decode=bucketed'; each runs in turn, "
                       "--rounds times, alternating (default: the defaults, once)")
        q.add_argument("--rounds", type=cli.int_in(1, cli.MAX_REPEATS), default=1)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # (a missing one: "required: what")
    try:
        args = p.parse_args(argv)
    except ConfigError as e:  # one line, exit 2
        return cli.fail(PROG, e)
    if getattr(args, "profile", False):  # per-op trace events; read when XLA:CPU starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_enable_xprof_traceme=true").strip()
    if getattr(args, "lora", 0) and args.arch in ARCHITECTURES:  # (1e5 ran for minutes silently)
        width = ARCHITECTURES[args.arch]().text.hidden_size
        if args.lora > width:
            _usage_error(f"--lora {args.lora}: above the {args.arch} LLM's width ({width}); a "
                         f"kernel changes in at most min(in, out) directions, so choose a rank "
                         f"of at most {width}")
    if args.what == "heatmap":
        strategies = ([s for s in HEATMAP_STRATEGIES if s != "auto"] if args.strategy == "all"
                      else [args.strategy])
        if args.strategy == "all" and not _native_heatmap():
            strategies.remove("fused")
        rows = [bench_heatmap(args.arch, s, args.batch, args.repeats, args.dtype, args.grid,
                              args.window) for s in strategies]
    elif args.what == "rollout":
        if not args.lora and (args.merge_lora or args.compare):  # both only act on a LoRA policy
            _usage_error(f"{'--merge-lora' if args.merge_lora else '--compare'}: only with "
                         "--lora RANK (the plain model has nothing to merge)")
        merge = args.merge_lora or "float32"
        merges = ("never", merge) if args.compare else (merge,)
        rows = alternate(args, lambda: bench_rollout(args.arch, args.batch, args.prompt_len,
                                                     args.new_tokens, args.repeats, args.lora,
                                                     merges))
    elif args.what == "grpo_step":
        for one, both in (("--sampler", "--compare"), ("--passes", "--compare-passes")):
            if getattr(args, one[2:]) is not None and getattr(args, both[2:].replace("-", "_")):
                # before: the first silently ignored
                _usage_error(f"{one}: not with {both}, which runs both of its values")
        samplers = ("today", "new") if args.compare else (args.sampler or "new",)
        rows = alternate(args, lambda: bench_grpo_step(
            args.arch, args.prompts, args.G, args.prompt_len, args.new_tokens, args.steps,
            lora=args.lora, resample_groups=args.resample_groups, samplers=samplers,
            passes=("full", "shared") if args.compare_passes else (args.passes or "shared",)))
    elif args.what == "train_step":
        rows = alternate(args, lambda: bench_train_step(args.arch, args.batch, args.seq_len,
                                                        args.repeats, args.peak_gflops,
                                                        args.profile))
    elif args.what == "matmul":
        rows = [bench_matmul(args.n, args.repeats)]
    elif args.what == "compile_time":
        if args.remat_policy is not None and not args.remat:  # before: ignored without a word
            _usage_error("--remat-policy: only with --remat (it picks what the rematerialised "
                         "layers keep)")
        rows = bench_compile_time(args.arch, args.text_layers, args.vit_layers, args.batch,
                                  args.seq_len, args.remat, args.remat_policy or "full")
    elif args.what == "gpu":
        import atexit
        import shutil
        import tempfile

        if not jax.config.jax_compilation_cache_dir:  # the compiler's figures cost no 2nd compile
            cache = tempfile.mkdtemp(prefix="emit_gpu_xla")
            atexit.register(shutil.rmtree, cache, ignore_errors=True)  # was left in /tmp
            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        from emit_jax import configs

        try:  # before the first compile: a bad --config is one line naming it
            configs.load(args.config)
        except ConfigError as e:
            _usage_error(f"--config: {e}")
        try:  # and the sizes, before the model is built
            check = gpucheck.from_args(args)
        except ConfigError as e:
            _usage_error(str(e))
        rows = alternate(args, lambda: gpucheck.run(check))
    else:
        unknown = [w for w in args.workloads.split(",") if w and w not in WORKLOADS]
        if unknown or not any(args.workloads.split(",")):
            _usage_error(f"--workloads {args.workloads!r}: choose from {', '.join(WORKLOADS)}")
        if not (args.python_hf or args.python_tunix):  # before: --peers-dir silently unused
            if args.peers_dir is not None:
                _usage_error(f"--peers-dir {args.peers_dir}: the peers run only with "
                             "--python-hf or --python-tunix (their interpreters); give one")
            print("note: no --python-hf or --python-tunix: no peer runs, emit_jax's own figures "
                  "only", file=sys.stderr)
        args.peers_dir = args.peers_dir or PEERS_DIR
        if args.python_hf or args.python_tunix:  # the peers' scripts, before our own runs
            missing = [n for n in peer_scripts(args.python_hf, args.python_tunix)
                       if not os.path.isfile(os.path.join(args.peers_dir, n))]
            if missing:
                _usage_error(f"--peers-dir {args.peers_dir}: no {', '.join(missing)} there (the "
                             "folder of the peers' benchmark scripts)")
        rows = compare(args.peers_dir, args.python_hf, args.python_tunix, args.rounds,
                       [w for w in args.workloads.split(",") if w])
        for row in rows:
            ratio = f"  emit_jax x{row['emit_jax_speedup']:.2f}" if "emit_jax_speedup" in row else ""
            print(f"{row['workload']:10s} {row['impl']:14s} {row['metric']:18s} "
                  f"{row['median']:12.4g}{ratio}", file=sys.stderr)
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


def _usage_error(text: str):
    """One ``python -m bench: error:`` line and exit status 2, as for any other bad flag."""
    print(f"python -m bench: error: {text}", file=sys.stderr)
    raise SystemExit(2)


#: the keys ``--kernels`` takes: the trace-time switches of ``emit_jax.ops.kernels``
KERNEL_KEYS = ("attention", "decode", "decode_bucket")


def parse_kernels(text: str) -> dict:
    """``'attention=dot_product,decode=bucketed'`` -> keyword arguments of ``kernel_options``."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            _usage_error(f"--kernels {text!r}: expected KEY=VALUE")
        if key.strip() in out:  # before: the last one silently won
            _usage_error(f"--kernels {text!r}: {key.strip()} given twice; give it once")
        if key.strip() not in KERNEL_KEYS:  # before: ignored without a word
            _usage_error(f"--kernels {text!r}: no kernel setting {key.strip()!r}; known: "
                         f"{', '.join(KERNEL_KEYS)}")
        if key.strip() == "decode_bucket" and not value.strip().isdigit():
            _usage_error(f"--kernels {text!r}: decode_bucket must be a whole number")
        out[key.strip()] = int(value) if key.strip() == "decode_bucket" else value.strip()
    return out


def _interpreter(text: str) -> str:
    """An argparse ``type``: a Python interpreter to run the peers with, checked when the command
    line is read (before: a missing one failed only when its first peer started, after our own
    runs)."""
    import shutil

    found = shutil.which(text) if os.sep not in text else text
    if not found or not os.path.isfile(found):
        raise argparse.ArgumentTypeError(f"{text}: no such interpreter")
    if not os.access(found, os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: not executable")
    return text


def alternate(args, bench) -> list[dict]:
    """``bench()`` under each ``--kernels`` variant in turn, ``--rounds`` times (this host is
    noisy: old and new alternate in one run); each row says its variant and round. A variant's
    programs are traced under its options (the benches build their jitted steps per call; the
    sampler's cache is keyed by them)."""
    from emit_jax.ops.kernels import kernel_options

    variants = [parse_kernels(k) for k in args.kernels]
    for v in variants:  # each checked before any run (before: a bad --config inside the bench
        try:            # was said as a --kernels error)
            with kernel_options(**v):
                pass
        except ValueError as e:
            _usage_error(f"--kernels: {e}")
    rows = []
    for rnd in range(args.rounds):
        for v in variants:
            with kernel_options(**v) as opts:
                row = bench()
            rows.append({**row, "kernels": dataclasses.asdict(opts), "round": rnd})
            print(json.dumps(rows[-1]), flush=True)
    return []


if __name__ == "__main__":
    cli.command(main, prog=PROG)
