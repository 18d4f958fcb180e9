"""The peers' well-written PyTorch heat map at our shape, in float32 or bfloat16.

    python bench/torch_heatmap.py [--arch internvl3_8b] [--grid G] [--window K] [--dtype bfloat16]
        [--peers-dir ../shared/bench]

Times ``matmul_dense`` of ``PEERS_DIR/matmul_heatmap_torch.py`` (normalise, one matmul per
layer, mask, max) at an architecture's contrastive-embedding shape (the shape
``python -m bench heatmap --arch ARCH`` uses) with its inputs in ``--dtype``: the
like-for-like anchor for our bf16 figure, since the peer script itself runs float32 only.
Prints one JSON line: best and median milliseconds per sample over ``--repeats``.

It lives outside the ``emit_jax`` package, which imports no torch (tests/test_security.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    sys.path.insert(0, ROOT)
    from emit_jax import cli
    from emit_jax.errors import ConfigError
    from emit_jax.models.architectures import ARCHITECTURES

    p = cli.Parser(description=__doc__.splitlines()[0], error_type=ConfigError)
    p.add_argument("--arch", default="internvl3_8b", choices=sorted(ARCHITECTURES))
    p.add_argument("--grid", type=cli.positive_int, default=None,
                   help="patch grid side (default: the arch's)")
    p.add_argument("--window", type=cli.nonneg_int, default=None,
                   help="half-window (default: EMIT's)")
    p.add_argument("--peers-dir", default=os.path.join(ROOT, "..", "shared", "bench"))
    p.add_argument("--repeats", type=cli.int_in(1, cli.MAX_REPEATS), default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    try:
        a = p.parse_args(argv)
    except ConfigError as e:  # one line, exit 2
        raise SystemExit(cli.fail("torch_heatmap", e)) from None
    path = os.path.join(a.peers_dir, "matmul_heatmap_torch.py")
    if not os.path.isfile(path):
        raise SystemExit(f"torch_heatmap: {path} not found (--peers-dir names ../shared/bench)")
    import torch

    from bench.heatmap import _heatmap_shape

    spec = importlib.util.spec_from_file_location("peer_matmul_heatmap_torch", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    L, g, d, R, k = _heatmap_shape(a.arch, a.grid, a.window)
    gen = torch.Generator().manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    q = torch.randn(L, 1, g, g, d, generator=gen).to(dtype)
    r = torch.randn(L, 1, R, g, g, d, generator=gen).to(dtype)
    with torch.no_grad():
        peer.matmul_dense(q, r, k)  # warm-up
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            peer.matmul_dense(q, r, k)
            times.append(time.perf_counter() - t)
    best = min(times)
    dense = 2 * L * (g * g) * (R * g * g) * d
    out = {"bench": "torch_heatmap", "arch": a.arch, "dtype": a.dtype, "impl": path,
           "shape": {"layers": L, "batch": 1, "rotations": R, "grid": g, "dim": d, "window": k},
           "ms_per_sample": 1000 * best, "ms_median_per_sample": 1000 * sorted(times)[len(times) // 2],
           "gflop_executed": dense / 1e9, "achieved_gflops": dense / best / 1e9,
           "torch_threads": torch.get_num_threads(), "repeats": a.repeats}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
