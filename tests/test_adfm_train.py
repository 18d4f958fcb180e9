"""AD-FM through the trainer at smoke size (CI): base stage with AD-FM's templated answers, then
GRPO on the AD-FM records with R_cls + R_loc + R_fmt, difficulty-aware resampling judged by
R_cls = 1, and the AD-FM evaluation (accuracy, mean IoU)."""

import json
import os

from conftest import train


def test_adfm_emit_smoke_run_trains_and_evaluates(tmp_path):
    r = train("--config", "configs/adfm_emit.py:smoke", "--workdir", str(tmp_path / "w"),
              "--config.base.steps=1", "--config.grpo.steps=1", "--config.eval_limit=2",
              "--config.eval_adfm=3", "--config.export_hf=False",
              env={"EMIT_JAX_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-4000:]
    w = tmp_path / "w"
    data = [json.loads(line) for line in open(w / "data" / "adfm.jsonl", encoding="utf-8")]
    assert data and all(d["solution"] in ("A", "B") for d in data)
    assert all(d["bbox_answer"] for d in data if d["solution"] == "A")
    res = json.load(open(w / "results.json", encoding="utf-8"))
    summary = res["adfm_test"]
    assert summary["questions"] == 3 and len(res["adfm_answers"]) == 3
    assert 0.0 <= summary["accuracy"] <= 100.0
    assert summary["located"] == summary["anomalous"]
    # the GRPO step logged AD-FM's reward components and the resampling counts
    rows = [json.loads(line) for line in open(w / "grpo" / "metrics.jsonl", encoding="utf-8")]
    keys = set().union(*rows)
    assert {"reward_adfm_cls", "reward_adfm_loc", "reward_adfm_fmt"} <= keys, sorted(keys)
    assert any("resampled" in k for k in keys)
    assert "AD-FM held-out, eval_adfm=3 (questions 3, " in r.stdout
    # balanced accuracy needs both kinds (twenty-second probe AD1: 0.0 with no normal question)
    both = summary["anomalous"] and summary["normal"]
    assert (summary["balanced_accuracy"] is None) == (not both), summary
    assert both or "balanced_accuracy n/a" in r.stdout
    assert os.path.isdir(w / "base" / "model")
