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


def test_adfm_compare_summary_and_row_configs():
    """The AD-FM comparison: every row shares the base stage's data and evaluation settings,
    and the table gives mean ± std (population) per row and column, '–' where a value is
    missing (a NaN mean IoU when no anomalous image was evaluated)."""
    from emit_jax.experiments import adfm_compare as C

    cfgs = {row: C.row_config(row, {"grpo.steps": 3}, 1) for row in C.ROWS}
    for row, cfg in cfgs.items():
        assert cfg.data.adfm and cfg.base.adfm and cfg.seed == 1 and cfg.grpo.steps == 3
        assert cfg.eval_adfm == cfgs["AD-FM"].eval_adfm and cfg.eval_adfm_tokens == 64
        assert cfg.stages[0] == "base" and not cfg.export_hf
    assert cfgs["EMIT"].stages == ("base", "sft", "grpo")
    assert cfgs["EMIT"].grpo.get("records", "grpo") == "grpo"
    assert cfgs["AD-FM"].grpo.records == "adfm" and not cfgs["AD-FM"].grpo.resample
    assert cfgs["AD-FM + difficulty-aware GRPO"].grpo.resample
    assert cfgs["AD-FM + difficulty-aware GRPO"].grpo.correct == "adfm_cls"
    runs = [{"row": "AD-FM", "seed": s, "average": a, "tasks": {"Anomaly Discrimination": a},
             "adfm": {"accuracy": a, "mean_iou": iou}}
            for s, a, iou in ((0, 50.0, 10.0), (1, 60.0, float("nan")))]
    table, data = C.summarize(runs)
    assert data["AD-FM"]["Anomaly Discrimination"]["mean"] == 55.0
    assert data["AD-FM"]["Anomaly Discrimination"]["std"] == 5.0
    assert data["AD-FM"]["mean IoU"]["values"] == [10.0]
    assert "| AD-FM | 55.0 ± 5.0 |" in table and "–" in table
