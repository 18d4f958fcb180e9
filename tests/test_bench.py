"""Benchmarks are scripts; CI only checks that they run at a tiny size and report sane fields."""

import json
import os
import subprocess
import sys

from emit_jax.ops import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the benchmarks live in the repository's bench/, not in the package
    sys.path.insert(0, ROOT)


def test_heatmap_bench_runs_tiny():
    r = subprocess.run([sys.executable, "-m", "bench", "heatmap", "--arch", "tiny",
                        "--repeats", "1", "--strategy", "all", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.strip().splitlines()]
    fused = ["fused"] if native.load() is not None else []  # skipped by bench when it cannot build
    assert [row["strategy"] for row in rows] == ["dense", "banded", "chunked", "tiled", "shifted", *fused]
    for row in rows:
        assert row["shape"] == {"layers": 4, "batch": 1, "rotations": 4, "grid": 16, "dim": 64,
                                "window": 3}
        assert row["ms_per_sample"] > 0 and row["achieved_gflops"] > 0
        assert row["gflop_executed"] >= row["window_gflop"]
    # --grid / --window: a wide grid where auto picks the native kernel, else the XLA strategy
    # with column groups
    row = _bench("heatmap", "--arch", "tiny", "--grid", "48", "--window", "2", "--repeats", "1")
    assert row["strategy"] == ("fused" if fused else "tiled")
    assert row["shape"]["grid"] == 48 and row["shape"]["window"] == 2
    assert row["gflop_executed"] >= row["window_gflop"]


def _bench(*args):
    r = subprocess.run([sys.executable, "-m", "bench", *args, "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_rollout_grpo_and_train_step_benches_run_tiny():
    row = _bench("rollout", "--arch", "tiny", "--batch", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--repeats", "1")
    assert row["new_tokens_per_s"] > 0 and row["batch"] == 2 and row["new_tokens"] == 4
    row = _bench("grpo_step", "--arch", "tiny", "--prompts", "1", "--G", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--steps", "1")
    assert set(row["phase_s_median"]) == {"generate", "ref_logprobs", "rewards", "update"}
    assert row["s_per_step_median"] >= sum(row["phase_s_median"].values()) * 0.99
    assert row["params_moved"] or row["groups_with_reward_spread"].startswith("0/")
    row = _bench("train_step", "--arch", "tiny", "--batch", "2", "--seq-len", "16", "--repeats",
                 "1", "--peak-gflops", "100", "--profile")
    # XLA's count of the forward + backward and 6 N T agree to a few percent at this size
    assert abs(row["xla_flops"] / row["flops_6nt"] - 1) < 0.2
    assert 0 < row["mfu"] < 1 and row["peak_gflops"] == 100
    prof = row["profile"]  # a real jax.profiler trace, read back: threads busy, XLA ops named
    assert prof["wall_ms_per_step"] > 0 and 0 < prof["thread_busy_fraction"] <= 1.05
    assert any(k.startswith("tf_XLA") for k in prof["thread_busy_ms_per_step"])
    assert prof["top_ops_ms_per_step"] and all(v >= 0 for v in prof["top_ops_ms_per_step"].values())
    assert sum(prof["top_ops_ms_per_step"].values()) <= 1.05 * len(
        prof["thread_busy_ms_per_step"]) * prof["wall_ms_per_step"]


PEERS = os.path.join(ROOT, "..", "shared", "bench")


def _torch_heatmap(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "torch_heatmap.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_torch_heatmap_bench_runs_the_peer_script_at_a_dtype():
    import pytest

    if not os.path.isfile(os.path.join(PEERS, "matmul_heatmap_torch.py")):
        pytest.skip(f"the peers' scripts are not beside this checkout ({PEERS})")
    for dt in ("float32", "bfloat16"):
        r = _torch_heatmap("--arch", "tiny", "--peers-dir", PEERS, "--repeats", "1", "--dtype", dt)
        assert r.returncode == 0, r.stderr[-3000:]
        row = json.loads(r.stdout.strip().splitlines()[-1])
        assert row["dtype"] == dt and row["ms_per_sample"] > 0
        assert row["shape"] == {"layers": 4, "batch": 1, "rotations": 4, "grid": 16, "dim": 64,
                                "window": 3}
        # the dense product count: 2 L (h w) (R h w) D
        assert row["gflop_executed"] == 2 * 4 * 256 * 1024 * 64 / 1e9


def test_torch_heatmap_bench_names_a_missing_peers_dir(tmp_path):
    r = _torch_heatmap("--arch", "tiny", "--peers-dir", str(tmp_path))
    assert r.returncode != 0 and "matmul_heatmap_torch.py not found" in r.stderr


def test_gpu_check_runs_at_tiny_size():
    """The prepared accelerator check (python -m bench gpu) at tiny size on the CPU:
    both steps run, the compiler's and the plan's figures are there, the loss is finite."""
    from bench import gpucheck

    out = gpucheck.run(gpucheck.GpuCheck(config=os.path.join(ROOT, "configs", "grpo.py"),
                                         arch="tiny", text_layers=2,
                                         vision_layers=2, sft_batch=2, prompts=1, G=4, micro=2,
                                         prompt_len=512, new_tokens=8, steps=1))
    assert out["sft"]["s_per_step"] > 0 and out["grpo"]["s_per_step"] > 0
    assert out["grpo"]["micro_batches"] == 2 and out["grpo"]["loss_finite"]
    for part in (out["sft"], out["grpo"]["xla_train_step"]):
        assert part["flops"] > 0 and part["temp_bytes"] > 0 and part["total_bytes"] > 0
    assert out["sft"]["plan_bytes"] > 0 and out["grpo"]["plan_bytes"] > 0
    assert set(out["grpo"]["phase_s"]) == {"generate", "ref_logprobs", "update"}


def test_gpu_check_refuses_a_model_the_cpu_host_cannot_hold():
    """Twenty-fifth probe B4: ``python -m bench gpu`` with its defaults (InternVL3-8B) on a
    CPU-only host printed nothing for three minutes and was killed by the kernel's OOM killer.
    Where jax runs on the CPU, a model whose weights (twice) exceed the memory available is
    refused in one line before it is built."""
    import pytest

    from bench.gpucheck import GpuCheck, check_host_memory
    from emit_jax.errors import ConfigError

    c = GpuCheck(arch="tiny", text_layers=2, vision_layers=2)
    check_host_memory(c, available=2**40)  # fits
    with pytest.raises(ConfigError) as e:
        check_host_memory(c, available=2**20)
    assert str(e.value).startswith("--arch tiny: needs at least ") and "its bf16 weights, " in str(e.value) and \
        str(e.value).endswith("GiB available; on a CPU run the check small (--arch tiny, as the "
                              "tests do), or on a GPU"), str(e.value)
