"""Integration: a few steps of every stage of the main job on the tiny config (CI), resume by
rerunning the same command, and the trained pieces behave (frozen MLLM in stage 1, LoRA +
full modules in stage 2, the reference untouched)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


from conftest import subprocess_env, train


@pytest.fixture(scope="module")
def run_dir(smoke_run):
    return smoke_run


def test_all_stages_run_and_export(run_dir):
    d, _, r = run_dir
    for stage in ("warmup", "base", "sft", "grpo"):
        assert os.path.isfile(d / stage / "done.json"), stage
        assert os.path.isfile(d / stage / "model" / "emit_jax.json"), stage
    assert "held-out test split" in r.stdout and "Average" in r.stdout
    res = json.loads((d / "results.json").read_text())
    assert set(res["stages"]) == {"warmup", "base", "sft", "grpo"}
    hist = res["stages"]["grpo"]["history"]
    assert len(hist) == 2 and all(k in hist[0] for k in ("reward", "acc", "kl", "resampled",
                                                          "entropy", "clip_frac"))
    # mu = 2: the second update of a batch sees a policy that moved since sampling
    assert all(h["ratio_mean"] != 1.0 for h in hist)
    assert any(k.startswith("acc/") for k in hist[0])
    # what a user sees: TensorBoard events per stage, curves and the results table as PNG
    for stage in ("warmup", "base", "sft", "grpo"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(d / stage / "tb")), stage
    for png in ("curves.png", "results.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(d / "hf" / "config.json") and os.path.isfile(d / "hf" / "emit_extras.safetensors")
    assert os.path.isfile(d / "hf" / "tokenizer.json")


def test_rerun_resumes_and_skips_finished_stages(run_dir):
    d, cache, _ = run_dir
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(d),
              env={"EMIT_JAX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-4000:]
    for stage in ("warmup", "base", "sft", "grpo"):
        assert f"[{stage}] already finished" in r.stderr


def test_more_steps_continue_from_the_last_checkpoint(tmp_path, run_dir):
    _, cache, _ = run_dir
    d = tmp_path / "w"
    # the smoke run's warm-up stage (its compiled step is in the session's compilation cache)
    common = ["--config", "configs/grpo.py:smoke", "--workdir", str(d),
              "--config.stages=('warmup',)", "--config.eval_limit=0", "--config.export_hf=False"]
    r1 = train(*common, "--config.warmup.steps=2", env={"EMIT_JAX_CACHE": str(cache)})
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = train(*common, "--config.warmup.steps=4", env={"EMIT_JAX_CACHE": str(cache)})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "[warmup] step 3/4" in r2.stderr and "[warmup] step 1/4" not in r2.stderr
    steps = [json.loads(l)["step"] for l in (d / "warmup" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_table1_reuses_shared_stages_and_reports_mean_std(tmp_path, run_dir):
    """The Table 1/2 driver: rows that share stages reuse them (here: the finished smoke run's),
    the SFT-instead-of-GRPO row trains ``sft2`` (LoRA), and the table holds every row."""
    d, cache, _ = run_dir
    common = tmp_path / "t1" / "seed0" / "common"
    common.mkdir(parents=True)
    for name in ("warmup", "base", "sft", "tokenizer", "data"):
        os.symlink(d / name, common / name)
    rows = "base model,+ stage 1 (SP + CE),+ SFT instead of GRPO"
    r = subprocess.run([sys.executable, "-m", "emit_jax.experiments.table1", "--seeds", "1",
                        "--workdir", str(tmp_path / "t1"), "--config", "configs/grpo.py:smoke",
                        "--rows", rows, "--set", "sft2.steps=2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1500, env=subprocess_env(EMIT_JAX_CACHE=str(cache)))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "[warmup] already finished" in r.stderr and "[sft2] step 2/2" in r.stderr
    out = json.loads((tmp_path / "t1" / "table1.json").read_text())
    assert [x["row"] for x in out["runs"]] == rows.split(",")
    for row in rows.split(","):
        assert f"| {row} |" in r.stdout
        vals = out["rows"][row]["Average"]["values"]
        assert len(vals) == 1 and out["rows"][row]["Average"]["std"] == 0.0
    assert os.path.isfile(tmp_path / "t1" / "seed0" / "sft2" / "sft2" / "model" / "emit_jax.json")


def test_table1_summary_is_mean_and_std_over_seeds():
    import numpy as np

    from emit_jax.experiments.table1 import summarize

    runs = [{"row": "+ GRPO", "seed": s, "average": a,
             "tasks": {"Anomaly Discrimination": ad, "Defect Classification": 25.0}}
            for s, a, ad in ((0, 40.0, 60.0), (1, 50.0, 70.0), (2, 45.0, 80.0))]
    table, data = summarize(runs)
    ad = data["+ GRPO"]["Anomaly Discrimination"]
    assert ad["mean"] == pytest.approx(70.0) and ad["std"] == pytest.approx(np.std([60, 70, 80]))
    assert "70.0 ± 8.2" in table and "3 seed(s)" in table
    assert "Object Classification" not in data["+ GRPO"]
    assert "collapsed" not in table
    runs[1]["letters"], runs[2]["letters"] = {"A": 30}, {"A": 20, "C": 10}
    assert "collapsed model): + GRPO (seed 1: A)" in summarize(runs)[0]


def test_table1_row_stages():
    from emit_jax.experiments.table1 import row_stages

    full = ("warmup", "base", "sft", "grpo")
    assert row_stages(full, "base") == ("warmup", "base")
    assert row_stages(full, "sft") == ("warmup", "base", "sft")
    assert row_stages(full, "sft2") == ("warmup", "base", "sft", "sft2")
    assert row_stages(("base", "sft", "grpo"), "grpo") == ("base", "sft", "grpo")
