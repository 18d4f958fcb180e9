"""``python -m bench compare``: ours and the peers of ``../shared/bench`` (transformers
``generate``, TRL ``GRPOTrainer``, Tunix's sampler and GRPO learner, the PyTorch heat maps), run
alternately, each in its own process (the peers in their own virtualenvs); medians and our
speed-up per workload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .steps import _median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEER_MODEL = ["512", "8", "8", "2", "1376", "32000"]  # hidden layers heads kv_heads mlp vocab


def _run_json(cmd: list[str], env: dict | None = None, timeout: int = 3600) -> dict | None:
    """Run ``cmd``; its last stdout line parsed as JSON (None, with the error on stderr, when it
    fails)."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or not lines:
        print(f"compare: {' '.join(cmd[:3])} ... failed ({r.returncode}): "
              f"{r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else ''}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


WORKLOADS = ("rollout", "grpo_step", "heatmap")


Job = tuple[str, list[str], dict, str, bool]  # who, command, env, metric, higher is better


def job_table(peers_dir: str, python_hf: str | None,
              python_tunix: str | None) -> dict[str, list[Job]]:
    """Per workload, ours then the peers the given interpreters run."""
    me = [sys.executable, "-m", "bench"]
    # ``bench`` is importable from the repository root, wherever this was started from
    mine = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    peer = lambda name: os.path.join(peers_dir, name)  # noqa: E731
    jobs: dict[str, list[Job]] = {
        "rollout": [("emit_jax", me + ["rollout"], mine, "new_tokens_per_s", True)],
        "grpo_step": [("emit_jax", me + ["grpo_step"], mine, "s_per_step_median", False)],
        "heatmap": [("emit_jax", me + ["heatmap", "--arch", "internvl3_8b"], mine,
                     "ms_per_sample", False)],
    }
    if python_hf:
        jobs["rollout"].append(("transformers", [python_hf, peer("peer_hf_generate.py"),
                                                 *PEER_MODEL, "16", "128", "128"], {},
                                "new_tokens_per_s", True))
        jobs["grpo_step"].append(("trl", [python_hf, peer("peer_trl_grpo.py"), *PEER_MODEL, "2",
                                          "8", "128", "128", "4"], {}, "s_per_step_median", False))
        jobs["heatmap"].append(("torch_matmul", [python_hf, peer("matmul_heatmap_torch.py")], {},
                                "ms_per_sample", False))
    if python_tunix:
        jobs["rollout"].append(("tunix", [python_tunix, peer("peer_tunix_grpo.py")],
                                {"PEER_WORKLOAD": "sampler"}, "new_tokens_per_s", True))
        jobs["grpo_step"].append(("tunix", [python_tunix, peer("peer_tunix_grpo.py")],
                                  {"PEER_WORKLOAD": "grpo"}, "s_per_step_median", False))
    return jobs


def peer_scripts(python_hf: str | None, python_tunix: str | None) -> list[str]:
    """The scripts of the peers' folder the given interpreters run (from :func:`job_table`)."""
    names = [cmd[1] for jobs in job_table("", python_hf, python_tunix).values()
             for who, cmd, *_ in jobs if who != "emit_jax"]
    return list(dict.fromkeys(names))


def compare(peers_dir: str, python_hf: str | None, python_tunix: str | None, rounds: int,
            workloads: list[str]) -> list[dict]:
    """Alternate ours and each peer per workload; medians over ``rounds`` and the ratios."""
    jobs = job_table(peers_dir, python_hf, python_tunix)
    rows = []
    for workload in workloads:
        values: dict[str, list[float]] = {}
        for _ in range(rounds):
            for who, cmd, env, metric, _ in jobs[workload]:
                out = _run_json(cmd, env)
                if out is not None and metric in out:
                    values.setdefault(who, []).append(float(out[metric]))
        ours = values.get("emit_jax")
        for who, _, _, metric, higher in jobs[workload]:
            if who not in values:
                continue
            med = _median(values[who])
            row = {"workload": workload, "impl": who, "metric": metric, "median": med,
                   "values": values[who]}
            if ours and who != "emit_jax":
                row["emit_jax_speedup"] = (_median(ours) / med) if higher else (med / _median(ours))
            rows.append(row)
    return rows
