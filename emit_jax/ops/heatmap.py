"""EMIT's local-window anomaly heat map (docs/reference/emit.md 5.2-5.3).

For every query patch (i, j) and layer l: the maximal cosine similarity to any reference patch
(r, i', j') with |i' - i| <= window and |j' - j| <= window, over all R reference copies (each in
its own grid); then the mean over layers, and the heat map is one minus that::

    H(i, j) = 1 - mean_l  S_l(i, j)
    S_l(i, j) = max_{r, |i'-i|<=k, |j'-j|<=k} cos(Fq_l(i, j), Fr_l(r, i', j'))        (Eq. 1)

``zero_fill=True`` is the official code: entries outside the window are *set to 0* before the
max, so wherever the window does not cover the whole grid S_l is ``max(0, windowed max)``.

Six exact strategies, all jitted, none materialising a ``[h*w, R*h*w, D]`` tensor:

- ``fused``: one native CPU kernel (``heatmap_cpu.cc``, built on first use by
  :mod:`emit_jax.ops.native`, called through XLA's FFI) that computes the similarities only
  inside the window, in register tiles of 4 query x 6 reference columns, with the normalisation
  and the masked max fused in: 1.2x the window's FLOPs at two thirds of this CPU's matmul peak.
  The default on a single CPU device when it builds; float32 maths (bf16 inputs are widened
  in registers, so they are read at half the bytes).

- ``dense``: one matmul per layer ``[h*w, D] x [D, R*h*w]`` plus a window mask, then max.
  Wasteful in FLOPs when the window is small, but a single large GEMM.
- ``banded``: for each of the ``2k+1`` row offsets, a batched matmul of each query row against
  the reference row at that offset (``[w, D] x [D, R*w]``), column-masked; a running max.
  ``(2k+1)/h`` of the dense FLOPs, still matmul-shaped. The default when that ratio is small.
- ``chunked``: the reference rows in chunks of ``CHUNK_ROWS`` (a reshape, no copy), each chunk
  one GEMM against the query rows within the window of it (gathered: the queries are R times
  smaller than the references), all chunks in one batched GEMM, the maxima scattered back.
  ``(c+2k)/h`` of the dense FLOPs without copying reference bands.
- ``tiled``: ``chunked`` with the columns split as well: the query columns in groups of
  ``GROUP_COLS``, each against only the reference columns within the window of its group (the
  rows-outer copy of the references, which ``chunked`` makes anyway, writes each group's columns
  out, overlapping by ``2k``). About ``(GROUP_COLS+2k)/w`` of ``chunked``'s FLOPs: a gain where
  that is under half (64 x 64, window 6: x1.5 faster than ``chunked``), none above.
- ``shifted``: for each of the ``(2k+1)^2`` offsets an elementwise product-and-sum against the
  shifted reference: the fewest FLOPs, but bandwidth-bound; useful for tiny D.

Inputs in bf16 are normalised in float32 and multiplied with float32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("auto", "dense", "banded", "chunked", "tiled", "shifted", "fused")
BLOCK_ROWS = 8  # query rows per GEMM in the banded strategy
CHUNK_ROWS = 2  # reference rows per chunk in the chunked and tiled strategies
GROUP_COLS = 16  # query columns per group in the tiled strategy
FUSED_TILE = (4, 6)  # query x reference columns per register tile of the fused kernel (M, N)
_EPS = 1e-8


def window_has_outside(h: int, w: int, window: int) -> np.ndarray:
    """``[h, w]`` bool: the window of patch (i, j) leaves some grid cell out, so the official
    zero fill puts a 0 among the candidates."""
    i = np.arange(h)[:, None]
    j = np.arange(w)[None, :]
    return (np.maximum(i, h - 1 - i) > window) | (np.maximum(j, w - 1 - j) > window)


def near_mask(h: int, w: int, window: int) -> np.ndarray:
    """``[h*w, h*w]`` bool: reference patch q is inside the window of query patch p."""
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    return (np.abs(ii[:, None] - ii[None, :]) <= window) & (np.abs(jj[:, None] - jj[None, :]) <= window)


def choose_strategy(h: int, w: int, window: int) -> str:
    """``dense`` when the row band covers 60% of the grid or more; else ``tiled`` when each
    column group meets at most half of the reference columns; else ``banded``. Measured on the
    2-core CPU (docs/performance.md "Heat-map speed"): ``tiled`` x1.5 faster than ``banded`` at 64 x 64 with
    window 6 (28 of 64 columns), no faster at 64 x 64 with window 12 (40 of 64) or at 32 x 32
    with window 6 (22 of 32)."""
    band = 2 * min(window, h - 1) + 1
    if band >= 0.6 * h:
        return "dense"
    _, _, wg, _ = _column_groups(w, window)
    return "tiled" if wg <= 0.5 * w else "banded"


def fused_available() -> bool:
    """Whether ``auto`` uses the native kernel: it builds here, and JAX runs on one CPU device
    (XLA would gather sharded operands onto every device to call it; the XLA strategies
    partition)."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    from emit_jax.ops import native

    return native.load() is not None


def _column_groups(w: int, window: int, group_cols: int = GROUP_COLS):
    """(groups, query columns per group, reference columns per group, first reference column of
    each group) of the tiled strategy; the last group's query columns may run past ``w``."""
    wq = min(group_cols, w)
    g = -(-w // wq)
    # the widest group's reach, clipped at the grid's edges (two groups of 16 at k 6: 22 each)
    wg = max(min(w, (i + 1) * wq + window) - max(0, i * wq - window) for i in range(g))
    return g, wq, wg, [int(np.clip(i * wq - window, 0, w - wg)) for i in range(g)]


def flops(L: int, B: int, R: int, h: int, w: int, D: int, window: int, strategy: str) -> int:
    """Multiply-add FLOPs (x2) of the similarity products a strategy executes."""
    if strategy == "auto":
        strategy = choose_strategy(h, w, window)
    if strategy == "dense":
        pairs = (h * w) * (R * h * w)
    elif strategy in ("chunked", "tiled"):
        c, k = min(CHUNK_ROWS, h), min(window, h - 1)
        # chunked: one group of all columns, as _layer_chunked calls _layer_tiled
        g, wq, wg, _ = _column_groups(w, window, GROUP_COLS if strategy == "tiled" else w)
        pairs = -(-h // c) * (c + 2 * k) * g * wq * c * R * wg
    elif strategy == "fused":
        m, k = FUSED_TILE[0], min(window, max(h, w))
        rows = _clipped_reach(h, k)
        cols = sum(min(m, w - j0) * (min(w, j0 + min(m, w - j0) + k) - max(0, j0 - k))
                   for j0 in range(0, w, m))
        pairs = rows * cols * R
    elif strategy == "banded":
        pairs = sum((min(h, min(a + BLOCK_ROWS, h) + window) - max(0, a - window))
                    * (min(a + BLOCK_ROWS, h) - a) for a in range(0, h, BLOCK_ROWS)) * w * R * w
    else:
        pairs = (2 * min(window, h - 1) + 1) * (2 * min(window, w - 1) + 1) * h * w * R
    return 2 * L * B * pairs * D


def window_flops(L: int, B: int, R: int, h: int, w: int, D: int, window: int) -> int:
    """Multiply-add FLOPs (x2) of the similarities inside the window, clipped at the grid's
    edges: what any exact method must compute."""
    k = min(window, max(h, w))
    return 2 * L * B * _clipped_reach(h, k) * _clipped_reach(w, k) * R * D


def _clipped_reach(n: int, k: int) -> int:
    """Sum over the n positions of one grid axis of how many positions lie within k of it."""
    return sum(min(n - 1, i + k) - max(0, i - k) + 1 for i in range(n))


def _inverse_norms(x: jax.Array) -> jax.Array:
    """``1 / max(|x|, eps)`` along the last axis, float32 (the axis dropped)."""
    x32 = x.astype(jnp.float32)
    return 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(x32 * x32, axis=-1)), _EPS)


def _normalize(x: jax.Array, inv: jax.Array | None = None) -> jax.Array:
    """Unit vectors along the last axis (float32 maths, result in the input dtype); ``inv``:
    :func:`_inverse_norms` of ``x`` when the caller has them already."""
    inv = _inverse_norms(x) if inv is None else inv
    return (x.astype(jnp.float32) * inv[..., None]).astype(x.dtype)


def _layer_dense(q, r, rinv, window, zero_fill):
    """q ``[B, h, w, D]`` (unit rows), r ``[B, R, h, w, D]`` (raw), rinv ``[B, R, h, w]`` (its
    inverse norms) -> S ``[B, h, w]``."""
    b, h, w, d = q.shape
    R = r.shape[1]
    s = jnp.einsum("bpd,bqd->bpq", q.reshape(b, h * w, d), r.reshape(b, R * h * w, d),
                   preferred_element_type=jnp.float32)  # [B, hw, R*hw]
    s = s * rinv.reshape(b, 1, R * h * w)
    near = jnp.asarray(np.tile(near_mask(h, w, window), (1, R)))
    s = jnp.where(near[None], s, 0.0 if zero_fill else -jnp.inf)
    return jnp.max(s, axis=-1).reshape(b, h, w)


def _floor(m, h, w, window, zero_fill):
    if not zero_fill:
        return m
    outside = jnp.asarray(window_has_outside(h, w, window))
    return jnp.where(outside[None], jnp.maximum(m, 0.0), m)


def _layer_banded(q, r, rinv, window, zero_fill, block_rows=BLOCK_ROWS):
    """Row-band strategy: query rows in blocks of ``block_rows``; each block is one GEMM against
    the reference rows within ``window`` of it (contiguous in a rows-outer layout), masked."""
    b, h, w, d = q.shape
    R = r.shape[1]
    rt = jnp.transpose(r, (0, 2, 1, 3, 4))  # [B, h, R, w, D]: a row band is contiguous
    it = jnp.transpose(rinv, (0, 2, 1, 3))  # [B, h, R, w]
    jj = np.arange(w)
    col_ok = np.abs(jj[:, None] - jj[None, :]) <= window  # [w (query), w (ref)]
    out = []
    for a in range(0, h, block_rows):
        z = min(a + block_rows, h)
        lo, hi = max(0, a - window), min(h, z - 1 + window + 1)
        qb = q[:, a:z].reshape(b, (z - a) * w, d)
        rb = rt[:, lo:hi].reshape(b, (hi - lo) * R * w, d)
        s = jnp.einsum("bpd,bqd->bpq", qb, rb, preferred_element_type=jnp.float32)
        s = s.reshape(b, z - a, w, hi - lo, R, w) * it[:, None, None, lo:hi]
        ii = np.arange(a, z)[:, None] - np.arange(lo, hi)[None, :]
        ok = (np.abs(ii) <= window)[:, None, :, None] & col_ok[None, :, None, :]  # [t, w, n, w]
        s = jnp.where(jnp.asarray(ok)[None, :, :, :, None, :], s, -jnp.inf)
        out.append(jnp.max(s, axis=(3, 4, 5)))
    best = jnp.concatenate(out, axis=1)
    return _floor(best, h, w, window, zero_fill)


def _layer_chunked(q, r, rinv, window, zero_fill, chunk_rows=CHUNK_ROWS):
    """Reference-chunk strategy: the reference rows (all R copies, rows-outer) in chunks of
    ``chunk_rows``, a pure reshape; the query rows within ``window`` of each chunk gathered into
    one ``[n, c + 2k rows, ...]`` array (the queries are R times smaller than the references, so
    this is the cheap side to copy); one batched GEMM over the chunks; the masked max per chunk
    scattered (max) back onto the query grid: :func:`_layer_tiled` with all columns in one group
    (the same values; measured as fast as the separate implementation it replaced)."""
    return _layer_tiled(q, r, rinv, window, zero_fill, chunk_rows, group_cols=q.shape[2])


def _layer_tiled(q, r, rinv, window, zero_fill, chunk_rows=CHUNK_ROWS, group_cols=GROUP_COLS):
    """``chunked`` with column groups: the query columns in ``g`` groups of ``wq``; group ``i``
    meets only the ``wg`` reference columns from ``starts[i]`` (those within ``window`` of it).
    The references are copied once into ``[B, n, g, c, R, wg, D]`` (chunk, group: contiguous),
    the query bands gathered into ``[B, n, g, c + 2k, wq, D]``; one batched GEMM over
    (chunk, group); the masked maximum of each (chunk, group) scattered (max) back onto the
    query grid."""
    b, h, w, d = q.shape
    R = r.shape[1]
    c, k = min(chunk_rows, h), min(window, h - 1)
    n = -(-h // c)
    hp, nb = n * c, c + 2 * k
    g, wq, wg, starts = _column_groups(w, window, group_cols)
    rp = jnp.pad(r, ((0, 0), (0, 0), (0, hp - h), (0, 0), (0, 0)))
    ip = jnp.pad(rinv, ((0, 0), (0, 0), (0, hp - h), (0, 0)))
    rg = jnp.stack([rp[:, :, :, s:s + wg] for s in starts])  # [g, B, R, hp, wg, D]
    rg = rg.reshape(g, b, R, n, c, wg, d).transpose(1, 3, 0, 4, 2, 5, 6)  # [B, n, g, c, R, wg, D]
    ig = jnp.stack([ip[:, :, :, s:s + wg] for s in starts])
    ig = ig.reshape(g, b, R, n, c, wg).transpose(1, 3, 0, 4, 2, 5)  # [B, n, g, c, R, wg]
    qp = jnp.pad(q, ((0, 0), (k, hp - h + k), (0, g * wq - w), (0, 0)))  # [B, k+hp+k, g*wq, D]
    idx = np.arange(n)[:, None] * c + np.arange(nb)[None, :]  # [n, nb] rows of qp
    qb = qp[:, idx].reshape(b, n, nb, g, wq, d).transpose(0, 1, 3, 2, 4, 5)  # [B, n, g, nb, wq, D]
    # one batch axis: XLA:CPU's batched GEMM ran at half speed with two (heatmap_parts)
    s = jnp.einsum("kpd,kqd->kpq", qb.reshape(b * n * g, nb * wq, d),
                   rg.reshape(b * n * g, c * R * wg, d), preferred_element_type=jnp.float32)
    s = s.reshape(b, n, g, nb, wq, c, R, wg) * ig[:, :, :, None, None]
    qi = idx - k  # the query row of each gathered row
    ri = np.arange(n)[:, None] * c + np.arange(c)[None, :]  # [n, c] reference rows
    row_ok = (np.abs(qi[:, :, None] - ri[:, None, :]) <= window) & (ri[:, None, :] < h)
    qj = np.arange(g)[:, None] * wq + np.arange(wq)[None, :]  # [g, wq] query columns
    rj = np.asarray(starts)[:, None] + np.arange(wg)[None, :]  # [g, wg] reference columns
    col_ok = np.abs(qj[:, :, None] - rj[:, None, :]) <= window  # [g, wq, wg]
    ok = row_ok[:, None, :, None, :, None] & col_ok[None, :, None, :, None, :]  # [n,g,nb,wq,c,wg]
    ok = jnp.asarray(ok[:, :, :, :, :, None, :])  # the R axis
    part = jnp.max(jnp.where(ok[None], s, -jnp.inf), axis=(5, 6, 7))  # [B, n, g, nb, wq]
    part = part.transpose(0, 1, 3, 2, 4).reshape(b, n, nb, g * wq)
    best = jnp.full((b, hp + 2 * k, g * wq), -jnp.inf, jnp.float32).at[:, idx].max(part)
    return _floor(best[:, k:k + h, :w], h, w, window, zero_fill)


def _layer_shifted(q, r, rinv, window, zero_fill):
    b, h, w, d = q.shape
    r = _normalize(r, rinv)  # element-wise products: the rows themselves must be unit
    kr, kc = min(window, h - 1), min(window, w - 1)
    r_pad = jnp.pad(r, ((0, 0), (0, 0), (kr, kr), (kc, kc), (0, 0)))
    valid = jnp.pad(jnp.ones((h, w), bool), ((kr, kr), (kc, kc)))
    offsets = np.array([(a, c) for a in range(2 * kr + 1) for c in range(2 * kc + 1)], np.int32)

    def body(best, off):
        rs = jax.lax.dynamic_slice(r_pad, (0, 0, off[0], off[1], 0), r.shape)
        ok = jax.lax.dynamic_slice(valid, (off[0], off[1]), (h, w))
        s = jnp.einsum("bijd,brijd->brij", q, rs, preferred_element_type=jnp.float32)
        s = jnp.where(ok[None, None], s, -jnp.inf)
        return jnp.maximum(best, jnp.max(s, axis=1)), None

    init = jnp.full((b, h, w), -jnp.inf, jnp.float32)
    best, _ = jax.lax.scan(body, init, jnp.asarray(offsets))
    return _floor(best, h, w, window, zero_fill)


def _fused_call(query, reference, window):
    """The native kernel: ``[L, B, h, w, D]``, ``[L, B, R, h, w, D]`` (both float32 or both
    bfloat16) -> S ``[L, B, h, w]`` float32 (before the zero fill); D zero-padded to a multiple
    of 16 (no change to dots or norms)."""
    from emit_jax.ops import native

    target = native.load()
    if target is None:
        raise RuntimeError(f"heat-map strategy 'fused' unavailable: {native.unavailable_reason()}")
    L, B, h, w, D = query.shape
    pad = -D % 16
    if pad:
        query = jnp.pad(query, ((0, 0),) * 4 + ((0, pad),))
        reference = jnp.pad(reference, ((0, 0),) * 5 + ((0, pad),))
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((L, B, h, w), jnp.float32),
                            vmap_method="sequential")
    return call(query, reference, window=np.int64(window), threads=np.int64(native.threads()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused_sims(query, reference, window):
    return _fused_call(query, reference, window)


def _fused_fwd(query, reference, window):
    return _fused_call(query, reference, window), (query, reference)


def _fused_bwd(window, res, g):
    # the kernel has no backward: differentiate the same S computed by an XLA strategy
    query, reference = res
    strategy = choose_strategy(*query.shape[2:4], window)
    return jax.vjp(lambda q, r: _xla_sims(q, r, window, False, strategy), query, reference)[1](g)


_fused_sims.defvjp(_fused_fwd, _fused_bwd)


_LAYER_FNS = {"dense": _layer_dense, "banded": _layer_banded, "chunked": _layer_chunked,
              "tiled": _layer_tiled, "shifted": _layer_shifted}


@functools.partial(jax.jit, static_argnames=("window", "zero_fill", "strategy"))
def _anomaly_map(query, reference, *, window, zero_fill, strategy):
    if strategy == "fused":  # all layers in one call; the kernel normalises
        dt = jnp.bfloat16 if query.dtype == reference.dtype == jnp.bfloat16 else jnp.float32
        sims = _fused_sims(query.astype(dt), reference.astype(dt), window)
        sims = _floor(sims, *query.shape[2:4], window, zero_fill)
    else:
        sims = _xla_sims(query, reference, window, zero_fill, strategy)
    return 1.0 - jnp.mean(sims, axis=0)


def _xla_sims(query, reference, window, zero_fill, strategy):
    """S ``[L, B, h, w]`` by an XLA strategy, layer by layer. The query (R times smaller) is
    normalised; the reference is not: its inverse norms scale the similarity columns after the
    GEMM, which saves a write and a read of the largest array."""
    qn = _normalize(query)
    rinv = _inverse_norms(reference)
    fn = functools.partial(_LAYER_FNS[strategy], window=window, zero_fill=zero_fill)
    return jax.lax.map(lambda a: fn(*a), (qn, reference, rinv))


def anomaly_map(query: jax.Array, reference: jax.Array, window: int, zero_fill: bool = True,
                strategy: str = "auto") -> jax.Array:
    """Heat map ``[B, h, w]`` float32 from per-layer patch features.

    query: ``[L, B, h, w, D]`` (CLS dropped); reference: ``[L, B, R, h, w, D]`` (R copies of the
    reference, e.g. its four rot90 rotations, each in its own grid). ``window``: the half-width
    k of the (2k+1)x(2k+1) neighbourhood. ``strategy``: ``auto`` | ``dense`` | ``banded`` |
    ``chunked`` | ``tiled`` | ``shifted`` | ``fused`` (all exact; ``auto`` picks ``fused`` where
    :func:`fused_available`, else by shape, see :func:`choose_strategy`).
    """
    if query.ndim != 5 or reference.ndim != 6:
        raise ValueError(f"query must be [L, B, h, w, D] and reference [L, B, R, h, w, D]; got "
                         f"{query.shape} and {reference.shape}")
    L, B, h, w, D = query.shape
    if reference.shape[:2] != (L, B) or reference.shape[3:] != (h, w, D):
        raise ValueError(f"reference {reference.shape} does not match query {query.shape}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return _anomaly_map(query, reference, window=int(window), zero_fill=bool(zero_fill),
                        strategy=resolve_strategy(strategy, h, w, window))


def resolve_strategy(strategy: str, h: int, w: int, window: int) -> str:
    """The strategy ``anomaly_map`` runs: ``auto`` -> ``fused`` where :func:`fused_available`,
    else :func:`choose_strategy`'s pick; any other name as given."""
    if strategy != "auto":
        return strategy
    return "fused" if fused_available() else choose_strategy(h, w, window)

