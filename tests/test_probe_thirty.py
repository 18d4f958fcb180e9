"""The thirtieth probe's findings (docs/reliability.md): a torn ``done.json`` names the way
forward, and that way works."""

from __future__ import annotations

import os

from conftest import train

from emit_jax.errors import ConfigError
from emit_jax.fileio import json_problem
from emit_jax.training import stages

SMOKE_BASE = ["--config", "configs/grpo.py:smoke", "--config.stages=('base',)",
              "--config.base.steps=2", "--config.checkpoint_every=1", "--config.eval_limit=2",
              "--config.export_hf=False"]


def test_json_problem_says_at_once():
    import json

    try:
        json.loads('{"ste')
    except json.JSONDecodeError as e:
        assert json_problem(e) == ("malformed JSON: Unterminated string starting at line 1 "
                                   "column 2")


def test_a_torn_done_json_names_the_way_forward_and_it_finishes_the_stage(tmp_path):
    """Thirtieth probe D2: a torn ``base/done.json`` was refused as "not a stage's done.json
    (malformed JSON: Unterminated string starting at at line 1 column 2)", without a way
    forward. The line says it (restore it, or remove it), and removing it finishes the stage
    again from its last checkpoint, with the same result."""
    wd = tmp_path / "wd"
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    done = wd / "base" / "done.json"
    steps = stages.done_steps(str(wd), "base")
    done.write_text('{"ste')
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=900)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    [line] = [x for x in r.stderr.splitlines() if "error" in x]
    assert line == (f"emit_jax.train: error: {done}: not a stage's done.json (malformed JSON: "
                    "Unterminated string starting at line 1 column 2); restore it, or remove it: "
                    "the next run finishes the stage from its last checkpoint (or trains it again "
                    "when it has none)"), line
    done.write_text('{"steps": true}')
    try:
        stages.done_steps(str(wd), "base")
        raise AssertionError("accepted")
    except ConfigError as e:
        assert str(e).endswith("(no step count); restore it, or remove it: the next run "
                               "finishes the stage from its last checkpoint (or trains it again "
                               "when it has none)"), e
    os.remove(done)
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("[base] resumes from its checkpoint at step 2 of 2: no step is left to run, its "
            "model is saved from that checkpoint") in r.stderr, r.stderr[-3000:]
    assert stages.done_steps(str(wd), "base") == steps == 2
