"""``python -m emit_jax.bench heatmap [--arch internvl3_8b] [--strategy auto] [--json]``

Benchmarks (scripts, not tests). ``heatmap`` times :func:`emit_jax.ops.heatmap.anomaly_map` at
an architecture's real CE shape (InternVL3-8B: 4 layers, 32 x 32 patches, D 1024, 4 rotations,
window 6) on random features, and reports milliseconds per sample and the achieved GFLOP/s of
the similarity products the strategy executes (``window_gflop``: the products inside the window,
the least any exact method must do).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp


def bench_heatmap(arch: str, strategy: str, batch: int, repeats: int, dtype: str) -> dict:
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMITConfig
    from emit_jax.ops.heatmap import anomaly_map, choose_strategy, flops

    cfg = architectures.get_config(arch)
    v = cfg.vision
    ecfg = EMITConfig()
    L = len(ecfg.layers_for(v.num_hidden_layers))
    g, d, R = v.grid, v.hidden_size, ecfg.rotations
    k = ecfg.window_for(g)
    kq, kr = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (L, batch, g, g, d), jnp.float32).astype(dtype)
    r = jax.random.normal(kr, (L, batch, R, g, g, d), jnp.float32).astype(dtype)
    chosen = choose_strategy(g, g, k) if strategy == "auto" else strategy
    anomaly_map(q, r, k, True, chosen).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        anomaly_map(q, r, k, True, chosen).block_until_ready()
        times.append(time.perf_counter() - t)
    best = min(times)
    executed = flops(L, batch, R, g, g, d, k, chosen)
    window_only = flops(L, batch, R, g, g, d, k, "shifted")
    return {
        "bench": "heatmap", "arch": arch, "strategy": chosen, "dtype": dtype,
        "shape": {"layers": L, "batch": batch, "rotations": R, "grid": g, "dim": d, "window": k},
        "ms_per_sample": 1000 * best / batch, "ms_median_per_sample": 1000 * sorted(times)[len(times) // 2] / batch,
        "gflop_executed": executed / 1e9, "window_gflop": window_only / 1e9,
        "achieved_gflops": executed / best / 1e9,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "host": platform.processor() or platform.machine(), "repeats": repeats,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emit_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("heatmap")
    h.add_argument("--arch", default="internvl3_8b")
    h.add_argument("--strategy", default="auto", choices=["auto", "dense", "banded", "shifted", "all"])
    h.add_argument("--batch", type=int, default=1)
    h.add_argument("--repeats", type=int, default=5)
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    h.add_argument("--json", action="store_true", help="one JSON object per line (default: also JSON)")
    args = p.parse_args(argv)
    strategies = ["dense", "banded", "shifted"] if args.strategy == "all" else [args.strategy]
    for s in strategies:
        print(json.dumps(bench_heatmap(args.arch, s, args.batch, args.repeats, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
