"""``python -m bench heatmap``: the CE heat map (:func:`emit_jax.ops.heatmap.anomaly_map`) timed at
an architecture's real shape (InternVL3-8B: 4 layers, 32 x 32 patches, D 1024, 4 rotations,
window 6) on random features: milliseconds per sample and the achieved GFLOP/s of the
similarity products the strategy executes (``window_gflop``: the products inside the window
clipped at the grid's edges, the least any exact method must do). ``bench/torch_heatmap.py``
times the peers' PyTorch version at the same shape (:func:`_heatmap_shape`).
"""

from __future__ import annotations

import platform
import sys
import time

import jax
import jax.numpy as jnp


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

