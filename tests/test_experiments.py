"""Pure parts of the experiment scripts."""

import numpy as np
import pytest

from emit_jax.experiments.heatmap_auroc import auroc, reduce_map


def test_auroc_equals_the_mann_whitney_statistic():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=60), 1)  # rounded: ties happen
    y = rng.integers(0, 2, size=60)
    pos, neg = s[y == 1], s[y == 0]
    # rank-sum form with mid-ranks for ties
    order = np.argsort(s, kind="stable")
    ranks = np.empty(60)
    ranks[order] = np.arange(1, 61)
    for v in np.unique(s):
        ranks[s == v] = ranks[s == v].mean()
    u = ranks[y == 1].sum() - len(pos) * (len(pos) + 1) / 2
    assert auroc(s, y) == pytest.approx(u / (len(pos) * len(neg)))
    assert auroc([1, 2, 3], [0, 0, 1]) == 1.0 and auroc([3, 2, 1], [0, 0, 1]) == 0.0
    assert np.isnan(auroc([1, 2], [1, 1]))


def test_reduce_map():
    h = np.arange(256, dtype=np.float32).reshape(16, 16)
    r = reduce_map(h)
    assert r["max"] == 255 and r["top8_mean"] == pytest.approx(251.5) and r["mean"] == pytest.approx(127.5)
