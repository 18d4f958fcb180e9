"""The paper's Tables 1 and 2 in miniature, on the embedded default dataset.

    python -m emit_jax.experiments.table1 --seeds 3 [--workdir runs/table1]
        [--config configs/grpo.py] [--set grpo.steps=40 ...]

Per seed (the model initialisation, the data order and the sampling keys change; the dataset
stays the same) it trains, sharing every stage the rows have in common:

=============================  ==========================================================
row                            stages
=============================  ==========================================================
base model                     base (the tiny MLLM, no soft prompt, no CE)
+ stage 1 (SP + CE)            ... -> sft (EMIT stage 1: soft prompt + heat-map projector)
+ GRPO                         ... -> grpo, ``resample=False, reweight=False`` (plain GRPO)
+ difficulty-aware GRPO        ... -> grpo as configured (EMIT)
+ SFT instead of GRPO          ... -> sft2 (stage 2's data, templated think answers, LoRA)
=============================  ==========================================================

and evaluates each on the held-out test split (``emit_jax.train``'s evaluation: rows with a
stage 2 answer in the think format, the others directly). It prints accuracy per task as
mean ± std over seeds (population std, ``numpy.std``) and writes ``WORKDIR/table1.md`` and
``WORKDIR/table1.json``. Below the table, for the GRPO rows, what stage 2 did (from each run's
``grpo/done.json``: groups with no correct completion in the first round, how many resampling
rescued, the share of the advantage mass on hard groups, training accuracy early and late:
:func:`stage2_diagnostics`), so a missing difficulty-aware gap can be explained. Finished runs
are reused: rerunning the command after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import numpy as np

from emit_jax import cli, configs
from emit_jax.errors import ConfigError, show_path
from emit_jax.fileio import atomic_output, check_no_control, finite_json

TASK_COLUMNS = ("Anomaly Discrimination", "Defect Classification", "Defect Localization",
                "Object Classification")

#: row name -> (run directory under the seed's directory, last stage, config overrides); a row
#: runs the config's stages up to and including its last stage (stage 2 rows: the stages before
#: ``sft`` ends, then their own)
ROWS = {
    "base model": ("common", "base", {}),
    "+ stage 1 (SP + CE)": ("common", "sft", {}),
    "+ GRPO": ("grpo_plain", "grpo", {"grpo.resample": False, "grpo.reweight": False}),
    "+ difficulty-aware GRPO": ("grpo_emit", "grpo", {}),
    "+ SFT instead of GRPO": ("sft2", "sft2", {}),
}
SHARED = ("warmup", "base", "sft", "tokenizer", "data")
UNSEEN_COLUMN = "AD, unseen images"


def row_stages(config_stages, last: str) -> tuple[str, ...]:
    """The stages a row runs: the config's stage-1 prefix (up to ``sft``), cut at ``last``, or
    followed by ``last`` for a stage-2 row."""
    prefix = []
    for s in config_stages:
        if s in ("grpo", "sft2"):
            break
        prefix.append(s)
    if last in prefix:
        return tuple(prefix[:prefix.index(last) + 1])
    return (*prefix, last)


def _link_shared(seed_dir: str, run_dir: str) -> None:
    """The variant's workdir sees the seed's finished shared stages (symlinks)."""
    os.makedirs(run_dir, exist_ok=True)
    for name in SHARED:
        src = os.path.join(seed_dir, "common", name)
        dst = os.path.join(run_dir, name)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.symlink(os.path.relpath(src, run_dir), dst)


#: settings that change nothing a row reports
_NOT_COMPARED = ("compile_cache",)


def _settings(config: dict) -> dict:
    """``{dotted key: value}`` of a resolved config (JSON), less :data:`_NOT_COMPARED`."""
    from emit_jax.training.stages import flat_config

    return {k: v for k, v in flat_config(config).items() if k not in _NOT_COMPARED}


def cached_row(cached: str, config: dict) -> dict | None:
    """The stored result ``cached`` of a finished row when it was made with the resolved config
    ``config`` (:func:`emit_jax.training.stages.config_json`); None when there is none, or when
    it was made with other settings (or recorded none): a note names them and the row runs
    again, where train continues, warns or refuses as for any rerun. Before, a stored result
    answered whatever the settings (``--set base.steps=3`` after a 1-step table reported the
    1-step results under the new overrides)."""
    if not os.path.isfile(cached):
        return None
    try:
        with open(cached, encoding="utf-8") as f:
            got = json.load(f)
    except (OSError, ValueError):
        got = None
    stored = got.get("config") if isinstance(got, dict) else None
    if isinstance(stored, dict) and _settings(stored) == _settings(config):
        return got
    if not isinstance(stored, dict):
        why = "unreadable" if got is None else "no settings recorded"
    else:
        old, now = _settings(stored), _settings(config)
        diff = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
        why = ", ".join(f"{k} {old.get(k, '-')!r} -> {now.get(k, '-')!r}" for k in diff[:6])
        why = "made with other settings: " + why + (f" and {len(diff) - 6} more"
                                                    if len(diff) > 6 else "")
    print(f"note: {show_path(cached)}: {why}; running the row again", file=sys.stderr,
          flush=True)
    return None


def check_table_folder(workdir: str, name: str) -> None:
    """Refuse a ``--workdir`` that exists, is not empty and holds nothing a table run makes
    (``seed<N>/`` folders, ``<name>.json`` / ``.md``): a folder of the user's (sixteenth probe
    S3: a dataset given as ``--workdir`` was trained into for ten minutes)."""
    if not os.path.isdir(workdir):
        return
    entries = os.listdir(workdir)
    if entries and not _table_run(workdir, name, entries):
        raise ConfigError(f"--workdir {show_path(workdir)}: not empty and holds no {name} run "
                          f"(no seed<N>/ or {name}.json in it); choose a new or empty folder")


def _table_run(workdir: str, name: str, entries: list[str]) -> bool:
    """Whether ``workdir`` holds what a table run wrote: its ``<name>.json`` (a JSON object
    with its rows) or a ``seed<N>/`` folder holding a training workdir. Names alone do not
    count (twenty-fourth probe TB1: a user's own table1.md made the folder one, and was
    replaced)."""
    from emit_jax.train import is_training_workdir

    try:
        with open(os.path.join(workdir, f"{name}.json"), encoding="utf-8") as f:
            if isinstance(data := json.load(f), dict) and "rows" in data:
                return True
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    for e in entries:
        seed_dir = os.path.join(workdir, e)
        if e.startswith("seed") and e[4:].isdigit() and os.path.isdir(seed_dir):
            if any(is_training_workdir(os.path.join(seed_dir, sub))
                   for sub in os.listdir(seed_dir)
                   if os.path.isdir(os.path.join(seed_dir, sub))):
                return True
    return False


def train_row(cfg, run_dir: str) -> dict:
    """``train.run(cfg, run_dir)``, its advice spelt as the experiments take settings (``--set
    restart=True``, not train's ``--config.restart=True``)."""
    from emit_jax import train

    try:
        return train.run(cfg, run_dir)
    except ConfigError as e:
        text = str(e).replace("--config.restart=True", "--set restart=True")
        if text == str(e):
            raise
        raise ConfigError(text) from None


def run_row(cfg_path: str, overrides: dict, seed: int, seed_dir: str, row: str) -> dict:
    from emit_jax.training.stages import config_json

    sub, last, extra = ROWS[row]
    cfg = configs.load(cfg_path, {**overrides, **extra, "seed": seed, "export_hf": False})
    cfg.stages = stages = row_stages(cfg.stages, last)
    run_dir = os.path.join(seed_dir, sub)
    tag = "_".join(stages)
    cached = os.path.join(run_dir, f"table1_{tag}.json")
    config = config_json(cfg)
    got = cached_row(cached, config)
    if got is not None:
        return got
    if sub != "common":
        _link_shared(seed_dir, run_dir)
    res = train_row(cfg, run_dir)
    letters = dict(Counter(str(a.get("gpt_answer")) for a in res.get("answers", ())))
    out = {"row": row, "seed": seed, "average": res.get("test_average"),
           "tasks": res.get("test_tasks", {}), "seconds": res.get("seconds"),
           "letters": letters,  # how often each answer letter was given (collapse shows here)
           # AD on every image of the unseen embedded datasets (config eval_unseen), or None
           "unseen_ad": res.get("unseen_tasks", {}).get(TASK_COLUMNS[0]),
           "unseen_questions": res.get("unseen_questions"),
           # every task asked on those images (config eval_unseen_tasks), or None
           "unseen_tasks": res.get("unseen_tasks"),
           "config": config}  # what a rerun compares (cached_row)
    with atomic_output(cached) as f:
        json.dump(finite_json(out), f, indent=1)
    return out


def mean_std_table(results: list[dict], rows, cols, value) -> tuple[list[str], dict]:
    """Markdown lines (header, rule, one line per row present in ``results``) with
    ``mean ± std`` (population) over the runs of each row, and the same as
    ``{row: {col: {"mean", "std", "values"}}}``. ``value(run, col)`` gives a float or None
    (left out; a cell with no value shows "–")."""
    lines = ["| Row | " + " | ".join(cols) + " |", "|:--" + "|--:" * len(cols) + "|"]
    data = {}
    for row in rows:
        rs = [r for r in results if r["row"] == row]
        if not rs:
            continue
        cells, data[row] = [], {}
        for col in cols:
            vals = [float(v) for v in (value(r, col) for r in rs) if v is not None]
            if not vals:
                cells.append("–")
                continue
            m, s = float(np.mean(vals)), float(np.std(vals))
            data[row][col] = {"mean": m, "std": s, "values": vals}
            cells.append(f"{m:.1f} ± {s:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines, data


def summarize(results: list[dict]) -> tuple[str, dict]:
    """Markdown table (mean ± std over seeds per row and task) and its JSON form."""
    seeds = sorted({r["seed"] for r in results})
    unseen = [r["unseen_questions"] for r in results if r.get("unseen_ad") is not None]
    cols = (*TASK_COLUMNS, "Average") + ((UNSEEN_COLUMN,) if unseen else ())
    lines, data = mean_std_table(
        results, ROWS, cols,
        lambda r, col: r["average"] if col == "Average" else r.get("unseen_ad")
        if col == UNSEEN_COLUMN else r["tasks"].get(col))
    note = f"held-out test split, {len(seeds)} seed(s) {seeds}: mean ± std (accuracy %, AD balanced)"
    if unseen:
        note += (f"; {UNSEEN_COLUMN}: AD on images of embedded datasets no stage saw "
                 f"(config eval_unseen, {max(unseen)} questions)")
    constant = [f"{r['row']} (seed {r['seed']}: {next(iter(r['letters']))})" for r in results
                if len(r.get("letters") or {}) == 1]
    if constant:  # a model that gives one letter to every question scores by the data alone
        note += ("\nthe same answer letter for every question (a collapsed model): "
                 + "; ".join(constant))
    out = "\n".join(lines) + f"\n\n{note}\n"
    more = unseen_table(results)
    if more:
        out += more[0]
        data = {**data, UNSEEN_TABLE: more[1]}
    return out, data


#: the JSON key of :func:`unseen_table`'s rows in ``table1.json``'s ``rows``
UNSEEN_TABLE = "unseen images, every task asked"


def unseen_table(results: list[dict]) -> tuple[str, dict] | None:
    """Markdown and JSON of every task asked on the unseen images (config
    ``eval_unseen_tasks``), mean ± std per row, with the average of those tasks; None when the
    runs asked anomaly discrimination alone there (the main table's unseen column has it)."""
    asked = [r for r in results if len(r.get("unseen_tasks") or {}) > 1]
    if not asked:
        return None
    cols = [c for c in TASK_COLUMNS if any(c in r["unseen_tasks"] for r in asked)]

    def value(r, col):
        t = r.get("unseen_tasks") or {}
        if col == "Average":
            vals = [t[c] for c in cols if t.get(c) is not None]
            return float(np.mean(vals)) if len(vals) == len(cols) else None
        return t.get(col)
    lines, data = mean_std_table(asked, ROWS, (*cols, "Average"), value)
    n = max(int(r.get("unseen_questions") or 0) for r in asked)
    return (f"\nUnseen images (config eval_unseen: embedded datasets no stage saw, {n} questions; "
            f"Average: of these {len(cols)} tasks):\n\n" + "\n".join(lines) + "\n", data)


def stage2_diagnostics(done: dict) -> dict:
    """What a GRPO row's stage 2 did, from its ``grpo/done.json`` (``counts``, ``history``):
    the share of sampled groups with no correct completion in their first round
    (``no_correct_first``), how many of those resampling rescued (``rescued``, of
    ``resampled``), the groups still without one (``no_correct_trained``: no signal), the
    resampling rounds run, the share of the advantage mass ``|A|`` on hard groups (1 to G/2 of
    G correct; ``rl.grpo.advantage_mass``; None for runs before it was logged) and the training
    accuracy of the first and the last ten steps (does the policy learn?)."""
    c, hist = done.get("counts") or {}, done.get("history") or []
    groups = max(int(c.get("groups", 0)), 1)
    first = max(int(c.get("groups_resampled", 0)), int(c.get("groups_without_correct", 0)))
    mass = [(h["adv_abs_hard"], h["adv_abs"]) for h in hist if "adv_abs" in h]
    total = sum(m[1] for m in mass)
    acc = [float(h["acc"]) for h in hist if "acc" in h]
    return {"groups": int(c.get("groups", 0)),
            "no_correct_first": 100.0 * first / groups,
            "resampled": int(c.get("groups_resampled", 0)),
            "rescued": int(c.get("groups_recovered", 0)),
            "no_correct_trained": int(c.get("groups_without_correct", 0)),
            "rounds": int(c.get("rounds_made", 0)),
            "hard_share": 100.0 * sum(m[0] for m in mass) / total if total > 0 else None,
            "acc_first": 100.0 * float(np.mean(acc[:10])) if acc else None,
            "acc_last": 100.0 * float(np.mean(acc[-10:])) if acc else None}


DIAG_COLUMNS = {"no_correct_first": "no correct in round 1 (% of groups)",
                "resampled": "groups resampled", "rescued": "rescued by resampling",
                "no_correct_trained": "trained with no correct", "rounds": "resampling rounds",
                "hard_share": "advantage mass on hard groups (%)",
                "acc_first": "train acc, first 10 steps", "acc_last": "train acc, last 10 steps"}


def diagnostics(workdir: str, results: list[dict]) -> str:
    """Markdown: stage 2 of each GRPO row, mean ± std over seeds (:func:`stage2_diagnostics`);
    empty when no GRPO row ran."""
    runs = []
    for r in results:
        sub, last, _ = ROWS[r["row"]]
        path = os.path.join(workdir, f"seed{r['seed']}", sub, last, "done.json")
        if last == "grpo" and os.path.isfile(path):
            with open(path) as f:
                runs.append({"row": r["row"], "d": stage2_diagnostics(json.load(f))})
    if not runs:
        return ""
    key = {label: k for k, label in DIAG_COLUMNS.items()}
    lines, _ = mean_std_table(runs, ROWS, list(key), lambda run, col: run["d"][key[col]])
    return ("\nStage 2, per GRPO row (mean ± std over seeds; hard groups: 1 to G/2 of G "
            "completions correct):\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m emit_jax.experiments.table1",
                    description=__doc__.split("\n\n")[0], error_type=ConfigError)
    ap.add_argument("--seeds", type=cli.positive_int, default=3, help="number of seeds (0, 1, ...)")
    ap.add_argument("--workdir", type=cli.nonempty, default="runs/table1")
    ap.add_argument("--config", default=os.path.join("configs", "grpo.py"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set grpo.steps=20 (repeatable)")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help="comma-separated subset of the rows (default: all)")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ConfigError(f"--rows: unknown row(s) {unknown}; known: {list(ROWS)}")
    if not rows:  # before: nothing ran and table1.md / .json were replaced by an empty table
        raise ConfigError(f"--rows {args.rows!r}: no row named; known: {list(ROWS)}")
    twice = sorted({r for r in rows if rows.count(r) > 1})
    if twice:  # (seventeenth probe EX6b: accepted, the row run twice)
        raise ConfigError(f"--rows: {', '.join(map(repr, twice))} named twice")
    check_no_control(args.workdir)
    if os.path.lexists(args.workdir) and not os.path.isdir(args.workdir):
        raise ConfigError(f"--workdir {show_path(args.workdir)}: a file, not a folder (name the "
                          "table's folder)")
    overrides = configs.parse_sets(args.set)
    from emit_jax.training.validate import validate_config

    # fail early on a bad config or override, as train would say it, before any folder is made
    # (seventeenth probe EX6b: --set grpo.steps=0 was refused after seed0/grpo_plain/ was made)
    for row in rows:
        cfg = configs.load(args.config, {**overrides, **ROWS[row][2]})
        cfg.stages = row_stages(cfg.stages, ROWS[row][1])
        validate_config(cfg)
    # the folder last: a bad argument is named first, whatever the folder holds
    check_table_folder(args.workdir, "table1")
    results = []
    for seed in range(args.seeds):
        seed_dir = os.path.join(args.workdir, f"seed{seed}")
        for row in rows:
            print(f"[table1] seed {seed}: {row}", file=sys.stderr, flush=True)
            results.append(run_row(args.config, overrides, seed, seed_dir, row))
    table, data = summarize(results)
    table += diagnostics(args.workdir, results)
    print(table)
    with atomic_output(os.path.join(args.workdir, "table1.md")) as f:
        f.write(table)
    with atomic_output(os.path.join(args.workdir, "table1.json")) as f:
        runs = [{k: v for k, v in r.items() if k != "config"} for r in results]
        json.dump(finite_json({"rows": data, "runs": runs, "overrides": overrides}), f,
                  indent=1)
    return 0


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.table1")
