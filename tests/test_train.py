"""Integration: a few steps of every stage of the main job on the tiny config (CI), resume by
rerunning the same command, and the trained pieces behave (frozen MLLM in stage 1, LoRA +
full modules in stage 2, the reference untouched)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*args, env=None):
    return subprocess.run([sys.executable, "-m", "emit_jax.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500,
                          env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(d),
              env={"EMIT_JAX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-4000:]
    return d, cache, r


def test_all_stages_run_and_export(run_dir):
    d, _, r = run_dir
    for stage in ("base", "sft", "grpo"):
        assert os.path.isfile(d / stage / "done.json"), stage
        assert os.path.isfile(d / stage / "model" / "emit_jax.json"), stage
    assert "held-out test split" in r.stdout and "Average" in r.stdout
    res = json.loads((d / "results.json").read_text())
    assert set(res["stages"]) == {"base", "sft", "grpo"}
    hist = res["stages"]["grpo"]["history"]
    assert len(hist) == 2 and all(k in hist[0] for k in ("reward", "acc", "kl", "resampled"))
    assert os.path.isfile(d / "hf" / "config.json") and os.path.isfile(d / "hf" / "emit_extras.safetensors")
    assert os.path.isfile(d / "hf" / "tokenizer.json")


def test_rerun_resumes_and_skips_finished_stages(run_dir):
    d, cache, _ = run_dir
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(d),
              env={"EMIT_JAX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-4000:]
    for stage in ("base", "sft", "grpo"):
        assert f"[{stage}] already finished" in r.stderr


def test_more_steps_continue_from_the_last_checkpoint(tmp_path, run_dir):
    _, cache, _ = run_dir
    d = tmp_path / "w"
    common = ["--config", "configs/sft.py:smoke", "--workdir", str(d), "--config.stages=('base',)",
              "--config.eval_limit=0", "--config.export_hf=False"]
    r1 = train(*common, "--config.base.steps=2", env={"EMIT_JAX_CACHE": str(cache)})
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = train(*common, "--config.base.steps=4", env={"EMIT_JAX_CACHE": str(cache)})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "[base] step 3/4" in r2.stderr and "[base] step 1/4" not in r2.stderr
    steps = [json.loads(l)["step"] for l in (d / "base" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
