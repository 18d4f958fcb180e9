"""Benchmarks are scripts; CI only checks that they run at a tiny size and report sane fields."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_heatmap_bench_runs_tiny():
    r = subprocess.run([sys.executable, "-m", "emit_jax.bench", "heatmap", "--arch", "tiny",
                        "--repeats", "1", "--strategy", "all", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.strip().splitlines()]
    assert [row["strategy"] for row in rows] == ["dense", "banded", "shifted"]
    for row in rows:
        assert row["shape"] == {"layers": 4, "batch": 1, "rotations": 4, "grid": 16, "dim": 64,
                                "window": 3}
        assert row["ms_per_sample"] > 0 and row["achieved_gflops"] > 0
        assert row["gflop_executed"] >= row["window_gflop"]
