"""EMIT, AD-FM and their combination in miniature, on the embedded default dataset.

    python -m emit_jax.experiments.adfm_compare --seeds 3 [--workdir runs/adfm_compare]
        [--set grpo.steps=20 ...]

Per seed, one shared base stage (``configs/adfm.py``'s: EMIT's four tasks plus AD-FM's
templated three-stage answers with the GT boxes), then three stage-2 recipes:

==================================  ==========================================================
row                                 after the shared base stage
==================================  ==========================================================
EMIT                                stage 1 (soft prompt + contrastive tokens) -> difficulty-
                                    aware GRPO on EMIT's four tasks (``configs/grpo.py``)
AD-FM                               plain GRPO on AD-FM's records and rewards
                                    (``configs/adfm.py``)
AD-FM + difficulty-aware GRPO       the same with resampling and reweighting, correct = R_cls 1
                                    (``configs/adfm_emit.py``)
==================================  ==========================================================

Every row is evaluated on the held-out test split twice: EMIT's four tasks (accuracy per task,
AD balanced) and AD-FM's three-stage prompt (AD accuracy, and localisation: the mean IoU of the
predicted boxes against the GT boxes of the anomalous images, one-to-one, and the hit rate at
IoU 0.1; :func:`emit_jax.evaluate.evaluate_adfm`). Prints mean ± std over seeds (population
std) and writes ``WORKDIR/adfm_compare.md`` / ``.json``. ``--set`` overrides apply to every
row. Finished runs are reused.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from emit_jax import cli
from emit_jax import configs
from emit_jax.experiments.table1 import (TASK_COLUMNS, cached_row, check_table_folder,
                                         mean_std_table, train_row)
from emit_jax.fileio import atomic_output, finite_json

CONFIG_DIR = "configs"
#: row -> (run directory under the seed's directory, config file, stages after the base stage)
ROWS = {
    "EMIT": ("emit", "grpo.py", ("sft", "grpo")),
    "AD-FM": ("adfm", "adfm.py", ("grpo",)),
    "AD-FM + difficulty-aware GRPO": ("adfm_emit", "adfm_emit.py", ("grpo",)),
}
SHARED = ("base", "tokenizer", "data")
ADFM_COLUMNS = (("AD-FM AD acc.", "accuracy"), ("AD-FM AD bal.", "balanced_accuracy"),
                ("mean IoU", "mean_iou"), ("hit@0.1", "hit_rate"))


def row_config(row: str, overrides: dict, seed: int, config_dir: str = CONFIG_DIR,
               smoke: bool = False):
    """The row's config: its recipe file (``:smoke`` with ``smoke``), the shared base stage's
    data (AD-FM records built, base.adfm on), the AD-FM evaluation as ``configs/adfm.py`` sets
    it (same question count and token budget for every row), and ``overrides``."""
    _, name, after = ROWS[row]
    tail = ":smoke" if smoke else ""
    adfm = configs.load(os.path.join(config_dir, "adfm.py") + tail)
    cfg = configs.load(os.path.join(config_dir, name) + tail, lock=False)
    cfg.data.adfm, cfg.base.adfm = True, True
    cfg.eval_adfm, cfg.eval_adfm_tokens = adfm.eval_adfm, adfm.grpo.max_new_tokens
    if "reward_kwargs" not in cfg.grpo:
        cfg.grpo.reward_kwargs = {}
    cfg.stages = ("base", *after)
    cfg.seed, cfg.export_hf = seed, False
    return configs.apply(cfg, overrides)


def _link_shared(seed_dir: str, first: str, run_dir: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    for name in SHARED:
        src, dst = os.path.join(seed_dir, first, name), os.path.join(run_dir, name)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.symlink(os.path.relpath(src, run_dir), dst)


def run_row(row: str, overrides: dict, seed: int, seed_dir: str, first: str,
            config_dir: str = CONFIG_DIR, smoke: bool = False) -> dict:
    from emit_jax.training.stages import config_json

    sub = ROWS[row][0]
    run_dir = os.path.join(seed_dir, sub)
    cached = os.path.join(run_dir, "adfm_compare.json")
    cfg = row_config(row, overrides, seed, config_dir, smoke)
    config = config_json(cfg)
    got = cached_row(cached, config)  # (before: reused whatever the settings, --smoke or not)
    if got is not None:
        return got
    if sub != first:
        _link_shared(seed_dir, first, run_dir)
    res = train_row(cfg, run_dir)
    out = {"row": row, "seed": seed, "average": res.get("test_average"),
           "tasks": res.get("test_tasks", {}), "adfm": res.get("adfm_test", {}),
           "seconds": res.get("seconds"), "config": config}
    with atomic_output(cached) as f:
        json.dump(finite_json(out), f, indent=1)
    return out


def summarize(results: list[dict]) -> tuple[str, dict]:
    seeds = sorted({r["seed"] for r in results})
    adfm_keys = dict(ADFM_COLUMNS)

    def value(r, col):
        v = (r["adfm"].get(adfm_keys[col]) if col in adfm_keys
             else r["average"] if col == "Average" else r["tasks"].get(col))
        return None if v is None or not np.isfinite(float(v)) else v
    lines, data = mean_std_table(results, ROWS, (*TASK_COLUMNS, "Average", *adfm_keys), value)
    note = (f"held-out test split, {len(seeds)} seed(s) {seeds}: mean ± std. EMIT's four tasks "
            "(accuracy %, AD balanced), then AD-FM's prompt on the test images (AD accuracy and "
            "balanced accuracy %, mean IoU x 100 of the anomalous images' boxes, hit rate % at "
            "IoU 0.1)")
    return "\n".join(lines) + f"\n\n{note}\n", data


def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m emit_jax.experiments.adfm_compare",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=cli.positive_int, default=3, help="number of seeds (0, 1, ...)")
    ap.add_argument("--workdir", default="runs/adfm_compare")
    ap.add_argument("--configs", default=CONFIG_DIR, help="folder holding grpo.py / adfm.py / "
                    "adfm_emit.py")
    ap.add_argument("--smoke", action="store_true", help="the configs' smoke settings (CI)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every row, e.g. --set grpo.steps=20")
    args = ap.parse_args(argv)
    overrides = configs.parse_sets(args.set)
    config_dir = args.configs
    if not os.path.isdir(config_dir):  # before: "config file not found: FILE/adfm.py"
        from emit_jax.errors import ConfigError
        from emit_jax.fileio import not_a_file

        what = (f"{not_a_file(config_dir) or 'a file'}, not a folder"
                if os.path.lexists(config_dir) else "no such folder")
        raise ConfigError(f"--configs {config_dir}: {what}; name the folder holding grpo.py, "
                          "adfm.py and adfm_emit.py")
    from emit_jax.training.validate import validate_config

    for row in ROWS:  # fail early on a bad config or override, as train would say it
        validate_config(row_config(row, overrides, 0, config_dir, args.smoke))
    # the folder last: a bad argument is named first, whatever the folder holds
    check_table_folder(args.workdir, "adfm_compare")
    results = []
    first = ROWS[next(iter(ROWS))][0]
    for seed in range(args.seeds):
        seed_dir = os.path.join(args.workdir, f"seed{seed}")
        for row in ROWS:
            print(f"[adfm_compare] seed {seed}: {row}", file=sys.stderr, flush=True)
            results.append(run_row(row, overrides, seed, seed_dir, first, config_dir,
                                   args.smoke))
    table, data = summarize(results)
    print(table)
    os.makedirs(args.workdir, exist_ok=True)
    with atomic_output(os.path.join(args.workdir, "adfm_compare.md")) as f:
        f.write(table)
    with atomic_output(os.path.join(args.workdir, "adfm_compare.json")) as f:
        runs = [{k: v for k, v in r.items() if k != "config"} for r in results]
        json.dump(finite_json({"rows": data, "runs": runs, "overrides": overrides}), f,
                  indent=1)
    return 0


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.adfm_compare")
