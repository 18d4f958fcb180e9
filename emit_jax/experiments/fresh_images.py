"""Anomaly discrimination trained on freshly generated images: does the tiny model generalise?

    python -m emit_jax.experiments.fresh_images --workdir W [--stage base|sft] [--seeds 12]
        [--steps 400] [--lr 1e-3] [--train all|stage] [--fixed-order | --ad-order yes_no]
        [--config configs/grpo.py] [--unseen N] [--set key=value ...]

The embedded default's 238 stage-1 anomaly-discrimination (AD) questions are few enough for the
tiny MLLM to memorise (docs/training.md). This experiment adds the AD questions of every
image of further embedded datasets (``emit_jax.data.embedded`` with seeds 1..``--seeds``: about
392 new images per seed, 7 s each to draw on a 2-core CPU; never the seed-0 dataset whose
validation and test splits are held out), so no training question repeats within a few hundred
steps, then evaluates held-out AD on the seed-0 test split.

- ``--stage base``: the base-model stage (no soft prompt, no contrastive tokens) on the AD
  questions with direct answers, from the random initialisation.
- ``--stage sft``: EMIT's stage 1 (soft prompt + contrastive tokens) on top of the config's base
  stage (run first into ``W`` when ``W/base/model`` is missing); ``--train stage`` trains what
  stage 1 trains (soft prompt + projector), ``--train all`` every parameter.
- ``--fixed-order``: every AD question, training and held-out, lists ``A. No.`` then ``B. Yes.``,
  so the answer letter *is* the belief (a diagnostic: EMIT shuffles the two options, which makes
  the letter the XOR of the belief and the option order). ``--ad-order yes_no`` builds every
  set (the run's own and the fresh ones) as ``A. Yes.`` / ``B. No.`` instead (``data.ad_order``,
  MMAD's order), which the workdir's records must have been built with.

``--unseen N`` also evaluates AD on every image of N embedded datasets no stage sees (the main
job's ``eval_unseen``); ``--set`` overrides config fields (``emit.max_readout=True``,
``base.train_vision=False``, ...). Prints the held-out table; the training log (loss, label
accuracy) goes to stderr as in ``emit_jax.train``.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time

from emit_jax import cli
from emit_jax.data.tasks import AD_ORDERS

AD = "anomaly_discrimination"
_NO_FIRST = "A. No.\nB. Yes.\n"
_YES_FIRST = "A. Yes.\nB. No.\n"
_FLIP = {"A": "B", "B": "A"}


def fixed_ad_order(record: dict) -> dict:
    """``record`` with an AD question's options put in the order No, Yes (a new dict; other
    records are returned as they are). The user turn, ``options``, the assistant answer (a
    letter, or a think answer's ``<answer>X</answer>``) and ``solution`` change together."""
    if record.get("task_type") != AD or list(record.get("options", ())) == ["No.", "Yes."]:
        return record
    if list(record.get("options", ())) != ["Yes.", "No."]:
        raise ValueError(f"record {record.get('id')}: AD options {record.get('options')} are not "
                         "Yes./No.")
    user = record["messages"][0]["content"]
    i = user.rfind(_YES_FIRST)
    if i < 0:
        raise ValueError(f"record {record.get('id')}: no 'A. Yes. / B. No.' lines in the prompt")
    out = dict(record, options=["No.", "Yes."])
    messages = [dict(m) for m in record["messages"]]
    messages[0]["content"] = user[:i] + _NO_FIRST + user[i + len(_YES_FIRST):]
    if len(messages) > 1:
        a = messages[1]["content"]
        messages[1]["content"] = _FLIP[a] if a in _FLIP else re.sub(
            r"<answer>([AB])</answer>", lambda m: f"<answer>{_FLIP[m.group(1)]}</answer>", a)
    out["messages"] = messages
    if "solution" in record:
        out["solution"] = _FLIP[record["solution"]]
    return out


def main(argv=None) -> dict:
    ap = cli.Parser(prog="python -m emit_jax.experiments.fresh_images",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default="configs/grpo.py")
    ap.add_argument("--stage", choices=("base", "sft"), default="sft")
    # checked where read (before: --steps -1, --lr nan, --batch-size 0 started the run)
    ap.add_argument("--seeds", type=cli.int_in(0, 1000), default=12,
                    help="extra embedded datasets 1..N")
    ap.add_argument("--steps", type=cli.positive_int, default=400)
    ap.add_argument("--batch-size", type=cli.positive_int, default=8)
    ap.add_argument("--lr", type=cli.positive_float, default=1e-3)
    ap.add_argument("--train", choices=("all", "stage"), default="all")
    ap.add_argument("--fixed-order", action="store_true",
                    help="every AD question as A. No. / B. Yes. (training and held-out)")
    ap.add_argument("--ad-order", choices=AD_ORDERS, default="shuffled",
                    help="data.ad_order of the run's own records and the fresh ones")
    ap.add_argument("--unseen", type=cli.int_in(0, 1000), default=0,
                    help="also evaluate AD on every image of N embedded datasets no stage saw")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. emit.max_readout=True (repeatable)")
    a = ap.parse_args(argv)

    from emit_jax import configs, train
    from emit_jax.training import stages
    from emit_jax.training.config import OptimConfig

    t0 = time.time()
    sets = dict(configs.parse_sets(a.set), **{"data.ad_order": a.ad_order})
    cfg = configs.load(a.config, sets)
    from emit_jax.training.config import STAGES

    for key in sets:  # (before: a --set of a stage it never runs, accepted without a word)
        if key.split(".")[0] in STAGES and key.split(".")[0] not in ("base", "sft"):
            print(f"note: --set {key}: not used, fresh_images trains only the base and sft "
                  "settings", file=sys.stderr, flush=True)
        elif key in ("eval_limit", "eval_unseen_limit", "eval_think", "export_hf"):
            # (twenty-fourth probe FI1: --set eval_limit=2, all questions asked, unsaid)
            print(f"note: --set {key}: not used, fresh_images asks every AD question of the "
                  "test split (and --unseen N's) and exports nothing", file=sys.stderr,
                  flush=True)
    cfg.export_hf = False
    from emit_jax.training.validate import validate_config

    # the recipe and its --set values checked as train checks them, before any image is drawn
    # (before: --set base.batch_size=-1 was found after minutes of drawing the fresh datasets)
    for line in validate_config(cfg).warnings():
        print(line, file=sys.stderr, flush=True)
    # the flags' own run, made (and so checked) before any image is drawn
    ocfg = OptimConfig.from_section(dict(cfg.sft, steps=a.steps, lr=a.lr, batch_size=a.batch_size),
                                    "sft")
    # a user's folder is no workdir (twenty-fourth probe FI1: --stage base trained into one,
    # its data/test.jsonl replaced by the records)
    train.check_is_workdir(a.workdir)
    if a.seeds == 0:  # (twentieth probe C95: a control run, not said)
        print("note: --seeds 0: no fresh datasets; the run trains on the workdir's own AD "
              "questions only (a control for the fresh-image runs)", file=sys.stderr, flush=True)
    if a.stage == "sft" and not os.path.isdir(os.path.join(a.workdir, "base", "model")):
        print(f"note: {a.workdir} has no base model (base/model): a base stage is trained there "
              "first, as train would", file=sys.stderr, flush=True)
        base_cfg = configs.load(a.config, sets)
        base_cfg.stages, base_cfg.eval_limit, base_cfg.export_hf = ("base",), 0, False
        train.run(base_cfg, a.workdir)  # takes the workdir's lock itself, and lets it go
    os.makedirs(a.workdir, exist_ok=True)
    # one writer per workdir, as train (before: it ran beside a trainer on the same workdir,
    # both writing its data/ and tokenizer/)
    with stages.workdir_lock(a.workdir):
        return _experiment(a, cfg, ocfg, t0)


def _experiment(a, cfg, ocfg, t0: float) -> dict:
    """The run itself, under the workdir's lock: the fresh datasets, the training, the
    held-out evaluation."""
    from flax import nnx

    from emit_jax.data.mmad import paper_task_name
    from emit_jax.eval.scoring import format_table
    from emit_jax.evaluate import evaluate_records
    from emit_jax.models.emit import EMIT, EMITConfig
    from emit_jax.training import stages
    from emit_jax.training.data import fresh_records, unseen_records
    from emit_jax.training.sft import run_sft

    source, tokenizer, records = stages.prepare_data(cfg, a.workdir)
    extra = fresh_records(range(1, a.seeds + 1), **stages.question_options(cfg))
    print(f"[fresh] {len(extra)} AD questions from {a.seeds} extra datasets "
          f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    own = [r for r in records["sft"] if r["task_type"] == AD]
    if a.stage == "base":
        own = [r for r in records["base"] if r["task_type"] == AD
               and not r["messages"][1]["content"].startswith("<think>")]
    recs = own + extra
    test = records["test"]
    if a.fixed_order:
        recs, test = [fixed_ad_order(r) for r in recs], [fixed_ad_order(r) for r in test]
    random.Random(cfg.seed).shuffle(recs)

    if a.stage == "base":
        model = stages.build_initial_model(cfg, tokenizer)
        wrt = nnx.Param
    else:
        model = stages.load_stage(a.workdir, "base")
        model = EMIT.create(model, EMITConfig(**dict(cfg.emit)), tokenizer=tokenizer,
                            rngs=nnx.Rngs(cfg.seed))
        wrt = nnx.Param if a.train == "all" else stages.stage1_trainable()
    name = f"fresh_{a.stage}_{a.train}" + ("_fixed" if a.fixed_order else "") + \
        ("_yes_no" if a.ad_order == "yes_no" else "")
    info = run_sft(model, recs, tokenizer, stages.pipeline_config(cfg, model),
                   ocfg, os.path.join(a.workdir, name), wrt=wrt, name=name, seed=cfg.seed,
                   checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                   pad_id=tokenizer.pad_token_id or 0)
    model.eval()
    ad_test = [r for r in test if r["task_type"] == AD]
    summary, rows = evaluate_records(model, tokenizer, ad_test, max_tiles=cfg.data.max_tiles,
                                     think=False, max_new_tokens=cfg.eval_max_new_tokens,
                                     root=source)
    print(format_table(summary, title=f"{name}: held-out AD ({len(rows)} questions), "
                       f"{len(recs)} training questions, {time.time() - t0:.0f} s"), flush=True)
    out = {"name": name, "train_questions": len(recs), "info": info,
           "held_out": {paper_task_name(t): summary.average[t] for t in summary.tasks}}
    if a.unseen:
        unseen = unseen_records(a.unseen, **stages.question_options(cfg))
        if a.fixed_order:
            unseen = [fixed_ad_order(r) for r in unseen]
        summary, rows = evaluate_records(model, tokenizer, unseen, max_tiles=cfg.data.max_tiles,
                                         think=False, max_new_tokens=cfg.eval_max_new_tokens)
        print(format_table(summary, title=f"{name}: AD on {a.unseen} unseen dataset(s) "
                           f"({len(rows)} questions)"), flush=True)
        out["unseen"] = {paper_task_name(t): summary.average[t] for t in summary.tasks}
    return out


if __name__ == "__main__":
    cli.command(lambda argv: (main(argv), 0)[1], prog="python -m emit_jax.experiments.fresh_images")
