"""Held-out evaluation one question at a time against several per generation, on a trained run.

    python -m emit_jax.experiments.eval_batch --workdir W [--batch 8] [--repeats 2]
        [--unseen 1] [--config configs/grpo.py] [--json]

On the run's exported model (``W/hf``), ``evaluate_records`` answers the run's test split (its
``W/data/test.jsonl``, the first 200, as the trainer's ``eval_limit``) with batch 1 and with
``--batch``, alternately ``--repeats`` times (this host is noisy), then the ``--unseen``
embedded datasets no stage saw (every task's questions, as the main job asks them) once each;
it prints each time, each split's accuracy per task, and how many answers the two agree on.
"""

from __future__ import annotations

import json
import os
import time

from emit_jax import cli


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m emit_jax.experiments.eval_batch",
                   description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a finished run's workdir (with hf/ and data/)")
    p.add_argument("--batch", type=cli.int_in(2, 1024), default=8)
    p.add_argument("--repeats", type=cli.int_in(1, 100), default=2)
    p.add_argument("--unseen", type=cli.int_in(0, 10), default=1)
    p.add_argument("--max-new-tokens", type=cli.int_in(1, 4096), default=48)
    p.add_argument("--config", default="configs/grpo.py",
                   help="the run's config, for how the unseen questions are asked")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from emit_jax import configs
    from emit_jax.data.prompts import TASKS
    from emit_jax.errors import ConfigError
    from emit_jax.evaluate import evaluate_records, load_for_eval
    from emit_jax.training import data as stage_data, stages

    for need in ("hf", os.path.join("data", "test.jsonl")):
        if not os.path.exists(os.path.join(args.workdir, need)):
            raise ConfigError(f"--workdir {args.workdir}: no {need} (a finished run's "
                              "workdir has both)")
    model, tok = load_for_eval(os.path.join(args.workdir, "hf"))
    model.eval()
    with open(os.path.join(args.workdir, "data", "test.jsonl")) as f:
        splits = {"test": [json.loads(line) for line in f][:200]}
    if args.unseen:
        cfg = configs.load(args.config)
        splits["unseen"] = stage_data.unseen_records(args.unseen, tasks_=TASKS,
                                                     **stages.question_options(cfg))
    out: dict = {}
    for name, recs in splits.items():
        times: dict = {1: [], args.batch: []}
        answers, tables = {}, {}
        for _ in range(args.repeats if name == "test" else 1):
            for b in (1, args.batch):
                t0 = time.time()
                summary, rows = evaluate_records(model, tok, recs, batch=b, max_tiles=1,
                                                 max_new_tokens=args.max_new_tokens)
                times[b].append(round(time.time() - t0, 1))
                answers[b] = [r["response"] for r in rows]
                tables[b] = {k: round(v, 1) for k, v in summary.average.items()}
        out[name] = {"questions": len(recs), "seconds": {str(k): v for k, v in times.items()},
                     "accuracy": {str(k): v for k, v in tables.items()},
                     "equal": sum(a == c for a, c in zip(answers[1], answers[args.batch]))}
    if args.json:
        print(json.dumps(out))
        return 0
    for name, r in out.items():
        print(f"{name}: {r['questions']} questions; {r['equal']} answers equal")
        for b in r["seconds"]:
            print(f"  batch {b}: {', '.join(f'{s} s' for s in r['seconds'][b])}; "
                  f"{r['accuracy'][b]}")
    return 0


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.eval_batch")
