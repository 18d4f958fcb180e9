"""The heat-map kernel against a plain NumPy implementation of its definition (docs/reference/emit.md 5.2-5.3)."""

import jax.numpy as jnp
import numpy as np
import pytest

from emit_jax.ops import native
from emit_jax.ops.heatmap import anomaly_map, choose_strategy, flops, window_flops


def _fused_or_skip(strategy):
    if strategy == "fused" and native.load() is None:
        pytest.skip(f"native heat-map kernel unavailable: {native.unavailable_reason()}")


def numpy_reference(query, reference, window, zero_fill):
    """Literal definition: loops over layers, samples, query patches; the official code's zero
    fill (masked similarities are 0 candidates) or the paper's Eq. (1)."""
    L, B, h, w, D = query.shape
    R = reference.shape[2]
    q = query.astype(np.float64)
    r = reference.astype(np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-8)
    r = r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-8)
    out = np.zeros((L, B, h, w))
    for l in range(L):
        for b in range(B):
            for i in range(h):
                for j in range(w):
                    cos = np.einsum("d,rxyd->rxy", q[l, b, i, j], r[l, b])  # [R, h, w]
                    xi = np.abs(np.arange(h) - i)[:, None] <= window
                    yj = np.abs(np.arange(w) - j)[None, :] <= window
                    near = np.broadcast_to(xi & yj, (R, h, w))
                    if zero_fill:
                        out[l, b, i, j] = np.where(near, cos, 0.0).max()
                    else:
                        out[l, b, i, j] = cos[near].max()
    return 1.0 - out.mean(0)


SHAPES = [  # (L, B, R, h, w, D, window)
    (2, 2, 4, 6, 6, 16, 1),      # square, R = 4
    (3, 1, 1, 5, 7, 8, 2),       # non-square grid, R = 1
    (1, 2, 4, 4, 5, 8, 9),       # window >= grid: no zero among the candidates
    (2, 1, 4, 8, 8, 12, 0),      # window 0: the same position only
    (4, 1, 4, 12, 10, 24, 3),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zero_fill", [True, False])
@pytest.mark.parametrize("strategy", ["dense", "banded", "chunked", "tiled", "shifted", "fused", "auto"])
def test_matches_numpy_definition(shape, zero_fill, strategy):
    _fused_or_skip(strategy)
    L, B, R, h, w, D, k = shape
    rs = np.random.RandomState(sum(shape))
    q = rs.randn(L, B, h, w, D).astype(np.float32)
    # references correlated with the query so that maxima are often positive and often negative
    r = (0.3 * q[:, :, None] + rs.randn(L, B, R, h, w, D)).astype(np.float32)
    if zero_fill is False:
        r = -np.abs(r) * np.sign(q[:, :, None])  # mostly negative cosines: the 0 fill matters
    want = numpy_reference(q, r, k, zero_fill)
    got = np.asarray(anomaly_map(jnp.asarray(q), jnp.asarray(r), k, zero_fill, strategy))
    assert got.shape == (B, h, w) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_zero_fill_changes_the_result_where_it_should():
    rs = np.random.RandomState(0)
    v = rs.randn(8).astype(np.float32)
    q = np.broadcast_to(v, (1, 1, 6, 6, 8))
    r = np.broadcast_to(-v, (1, 1, 2, 6, 6, 8))  # every cosine is -1
    official = np.asarray(anomaly_map(jnp.asarray(q), jnp.asarray(r), 1, True))
    paper = np.asarray(anomaly_map(jnp.asarray(q), jnp.asarray(r), 1, False))
    np.testing.assert_allclose(official, 1.0, atol=1e-6)  # capped: max(0, -1) = 0
    np.testing.assert_allclose(paper, 2.0, atol=1e-6)


@pytest.mark.parametrize("strategy", ["dense", "banded", "chunked", "tiled", "shifted", "fused"])
def test_bf16_inputs_accumulate_in_fp32(strategy):
    _fused_or_skip(strategy)
    L, B, R, h, w, D, k = 2, 1, 4, 8, 8, 64, 2
    rs = np.random.RandomState(1)
    q = rs.randn(L, B, h, w, D).astype(np.float32)
    r = (0.5 * q[:, :, None] + rs.randn(L, B, R, h, w, D)).astype(np.float32)
    qb, rb = jnp.asarray(q, jnp.bfloat16), jnp.asarray(r, jnp.bfloat16)
    want = numpy_reference(np.asarray(qb, np.float32), np.asarray(rb, np.float32), k, True)
    got = anomaly_map(qb, rb, k, True, strategy)
    assert got.dtype == jnp.float32
    # bf16 rounding of the normalised vectors only (sums are fp32); the fused kernel widens the
    # bf16 inputs exactly and normalises in fp32, so it matches the bf16 values' definition
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6 if strategy == "fused" else 2e-2)
    if strategy == "fused":  # D 40: zero-padded to 48 in bf16
        got = anomaly_map(qb[..., :40], rb[..., :40], k, False, strategy)
        want = numpy_reference(np.asarray(qb[..., :40], np.float32),
                               np.asarray(rb[..., :40], np.float32), k, False)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


@pytest.mark.parametrize("strategy", ["tiled", "fused"])
@pytest.mark.parametrize("zero_fill", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 2, 9, 40, 8, 3), (2, 1, 4, 7, 50, 6, 5)])
def test_column_tiles_on_a_wide_grid(shape, zero_fill, strategy):
    """tiled: widths 40 / 50 make 3 / 4 groups of 16 query columns, the last one partly padding;
    the reference columns of each group are clipped at the grid's edges. fused: tiles of 4
    query columns (50: the last one 2 wide) against runs of up to 6 reference columns, D 8 and 6
    zero-padded to 16."""
    _fused_or_skip(strategy)
    L, B, R, h, w, D, k = shape
    rng = np.random.default_rng(1)
    q = rng.standard_normal((L, B, h, w, D)).astype(np.float32)
    r = rng.standard_normal((L, B, R, h, w, D)).astype(np.float32)
    want = numpy_reference(q, r, k, zero_fill)
    got = np.asarray(anomaly_map(jnp.asarray(q), jnp.asarray(r), k, zero_fill, strategy))
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_strategy_choice_and_flops():
    assert choose_strategy(32, 32, 6) == "banded"
    assert choose_strategy(8, 8, 6) == "dense"
    assert choose_strategy(64, 64, 6) == "tiled"  # groups of 16 columns meet 28 of 64
    assert choose_strategy(64, 64, 12) == "banded"  # 40 of 64
    dense = flops(4, 1, 4, 32, 32, 1024, 6, "dense")
    assert dense == 2 * 4 * 1024 * 4096 * 1024
    # blocks of 8 query rows reach 14, 20, 20, 14 reference rows: 544 of 32 x 32 row pairs
    assert flops(4, 1, 4, 32, 32, 1024, 6, "banded") == dense * 544 // 1024
    assert flops(4, 1, 4, 32, 32, 1024, 6, "shifted") == 2 * 4 * 4 * 1024 * 169 * 1024
    # chunks of 2 reference rows meet 14 query rows; tiled: 2 groups of 16 query columns, each
    # against 22 reference columns (16 + 6, clipped at the edge) instead of 32
    chunked = flops(4, 1, 4, 32, 32, 1024, 6, "chunked")
    assert chunked == 2 * 4 * 16 * 14 * 32 * 2 * 4 * 32 * 1024
    assert flops(4, 1, 4, 32, 32, 1024, 6, "tiled") == chunked * 22 // 32
    # fused: each tile of 4 query columns meets 4 + 2*6 = 16 reference columns, clipped at the
    # edges (tiles at j0 = 0, 4, 8..20, 24, 28: 10, 14, 16 x 4, 14, 10); rows as the window
    rows = sum(min(31, i + 6) - max(0, i - 6) + 1 for i in range(32))  # 374
    cols = 4 * (10 + 14 + 16 * 4 + 14 + 10)
    assert flops(4, 1, 4, 32, 32, 1024, 6, "fused") == 2 * 4 * rows * cols * 4 * 1024
    window = window_flops(4, 1, 4, 32, 32, 1024, 6)
    assert window == 2 * 4 * rows * rows * 4 * 1024  # 4.58 GFLOP: 374 x 374 of 32^2 x 32^2 pairs
    assert window < flops(4, 1, 4, 32, 32, 1024, 6, "fused") < 1.2 * window


def test_fused_gradient_is_the_xla_strategies():
    """The native kernel has no backward: its custom VJP differentiates the same similarities
    computed by an XLA strategy."""
    import jax

    _fused_or_skip("fused")
    rs = np.random.RandomState(3)
    q = jnp.asarray(rs.randn(2, 1, 6, 7, 16), jnp.float32)
    r = jnp.asarray(rs.randn(2, 1, 2, 6, 7, 16), jnp.float32)

    def loss(strategy):
        return lambda q, r: jnp.sum(anomaly_map(q, r, 2, True, strategy) ** 2)

    want = jax.grad(loss("banded"), argnums=(0, 1))(q, r)
    got = jax.grad(loss("fused"), argnums=(0, 1))(q, r)
    assert float(jnp.abs(want[0]).max()) > 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="does not match"):
        anomaly_map(jnp.zeros((1, 1, 4, 4, 8)), jnp.zeros((1, 1, 2, 4, 5, 8)), 1)
    with pytest.raises(ValueError, match="strategy"):
        anomaly_map(jnp.zeros((1, 1, 4, 4, 8)), jnp.zeros((1, 1, 2, 4, 4, 8)), 1, strategy="x")


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 16])
def test_chunked_any_chunk_size_matches_dense(chunk_rows):
    """Chunks that do not divide the grid (padded reference rows must never win the max)."""
    import jax

    from emit_jax.ops import heatmap as H

    rs = np.random.RandomState(chunk_rows)
    q = H._normalize(jnp.asarray(rs.randn(2, 7, 6, 8), jnp.float32))
    r = jnp.asarray(-np.abs(rs.randn(2, 3, 7, 6, 8)) * rs.uniform(0.1, 10, (2, 3, 7, 6, 1)),
                    jnp.float32)  # raw reference rows of assorted norms (scaled after the GEMM)
    rinv = H._inverse_norms(r)
    for k, zero_fill in ((1, True), (2, False), (8, False)):
        want = H._layer_dense(q, r, rinv, k, zero_fill)
        got = jax.jit(lambda q, r: H._layer_chunked(q, r, rinv, k, zero_fill, chunk_rows))(q, r)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_heatmap_parts_script_runs_at_a_tiny_size(capsys):
    import json

    from emit_jax.experiments import heatmap_parts

    out = heatmap_parts.main(["--grid", "8", "--dim", "16", "--repeats", "1"])
    assert json.loads(capsys.readouterr().out.strip()) == out
    assert out["shape"]["h"] == 8 and out["gflop"] > 0
    assert all(out[k] > 0 for k in ("gemm_prearranged", "layout", "gemm_with_layout", "heatmap"))
