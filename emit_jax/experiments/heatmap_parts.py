"""Where the ``chunked`` heat map's time goes, at the InternVL3-8B shape (docs/performance.md "Heat-map speed").

    python -m emit_jax.experiments.heatmap_parts [--chunk-rows 2] [--repeats 7] [--grid 32 --dim 1024]

Times, each jitted on its own (best of ``--repeats``, milliseconds):

- ``gemm_prearranged``: only the batched GEMM + max of all layers (one batch axis: layers x
  chunks), its operands already in the chunked layout (what the FLOPs alone cost);
- ``normalize``: normalising the query features and taking the reference rows' inverse norms
  (reduced to a scalar, so nothing big is written);
- ``layout``: the rows-outer transpose of the references and the gather of the query bands;
- ``gemm_with_layout``: layout + GEMM + max per layer (``lax.map`` over layers);
- ``heatmap``: :func:`emit_jax.ops.heatmap.anomaly_map` with ``strategy='chunked'``.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from emit_jax import cli
from emit_jax.fileio import finite_json
from emit_jax.errors import ConfigError
from emit_jax.limits import MAX_GRID, MAX_MATRIX_SIDE, MAX_REPEATS
from emit_jax.ops import heatmap as H

SHAPE = dict(L=4, B=1, R=4, h=32, w=32, D=1024, window=6)


def _best_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return round(1000 * min(times), 1)


def main(argv=None) -> dict:
    p = cli.Parser(prog="python -m emit_jax.experiments.heatmap_parts",
                   description=__doc__.splitlines()[0])
    # bounded where read (before: 0 or -1 were tracebacks: ZeroDivisionError, ValueError)
    p.add_argument("--chunk-rows", type=cli.int_in(1, MAX_GRID), default=H.CHUNK_ROWS)
    p.add_argument("--repeats", type=cli.int_in(1, MAX_REPEATS), default=7)
    p.add_argument("--grid", type=cli.int_in(1, MAX_GRID), default=SHAPE["h"],
                   help=f"patch grid side, at most {MAX_GRID} (tests: small)")
    p.add_argument("--dim", type=cli.int_in(1, MAX_MATRIX_SIDE), default=SHAPE["D"],
                   help="feature width")
    a = p.parse_args(argv)
    shape = dict(SHAPE, h=a.grid, w=a.grid, D=a.dim)
    L, B, R, h, w, D, k = (shape[x] for x in ("L", "B", "R", "h", "w", "D", "window"))
    c = a.chunk_rows
    n, nb = h // c, c + 2 * k
    if h % c:
        raise ConfigError(f"--chunk-rows {c}: must divide the {h}-row grid (--grid)")
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((L, B, h, w, D)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((L, B, R, h, w, D)), jnp.float32)
    idx = np.arange(n)[:, None] * c + np.arange(nb)[None, :]

    def layout(q1, r1):  # one layer: [B, n, nb*w, D] query bands, [B, n, c*R*w, D] chunks
        rc = jnp.transpose(r1, (0, 2, 1, 3, 4)).reshape(B, n, c * R * w, D)
        qb = jnp.pad(q1, ((0, 0), (k, k), (0, 0), (0, 0)))[:, idx].reshape(B, n, nb * w, D)
        return qb, rc

    def gemm_max(qb, rc):  # the batch axes flattened into one: XLA:CPU's batched GEMM was
        # measured twice as slow with two or three batch axes (82 against 45 ms here)
        return jnp.einsum("kpd,kqd->kpq", qb.reshape(-1, *qb.shape[-2:]),
                          rc.reshape(-1, *rc.shape[-2:])).max(-1)

    qb_all, rc_all = jax.jit(jax.vmap(layout))(q, r)
    out = {
        "shape": shape, "chunk_rows": c,
        "gflop": H.flops(L, B, R, h, w, D, k, "chunked") / 1e9 if c == H.CHUNK_ROWS else None,
        "gemm_prearranged": _best_ms(jax.jit(gemm_max), qb_all, rc_all, repeats=a.repeats),
        "normalize": _best_ms(jax.jit(lambda q, r: jnp.sum(H._normalize(q))
                                      + jnp.sum(H._inverse_norms(r))), q, r, repeats=a.repeats),
        "layout": _best_ms(jax.jit(lambda q, r: jax.lax.map(
            lambda x: sum(jnp.sum(y) for y in layout(*x)), (q, r))), q, r, repeats=a.repeats),
        "gemm_with_layout": _best_ms(jax.jit(lambda q, r: jax.lax.map(
            lambda x: gemm_max(*layout(*x)), (q, r))), q, r, repeats=a.repeats),
        "heatmap": _best_ms(lambda q, r: H.anomaly_map(q, r, k, True, "chunked"), q, r,
                            repeats=a.repeats),
        "device": f"{jax.default_backend()}",
    }
    print(json.dumps(finite_json(out)))
    return out


if __name__ == "__main__":
    cli.command(lambda argv: (main(argv), 0)[1], prog="python -m emit_jax.experiments.heatmap_parts")
