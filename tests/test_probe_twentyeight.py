"""Findings of the twenty-eighth reliability probe (docs/reliability.md) not covered where their
code's own tests live (test_metrics, test_launch)."""

from __future__ import annotations

import json
import os

from conftest import train


def test_a_damaged_stage_settings_file_says_the_way_out_and_restart_takes_it(tmp_path):
    """P6: a damaged ``base/settings.json`` was refused ("not a stage settings file (malformed
    JSON ...)") without a word on what to do, and ``--config.restart=True`` got the same
    refusal. Now the line names both ways out, and restart trains the stage again, the old
    output moved to replaced-<time>/."""
    w = tmp_path / "w"
    args = ("--config", "configs/grpo.py:smoke", "--workdir", str(w), "--config.stages=base",
            "--config.base.steps=1", "--config.eval_limit=0", "--config.export_hf=False")
    r = train(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    settings = w / "base" / "settings.json"
    settings.write_text("xx{not json")
    r = train(*args)
    assert r.returncode == 2
    errors = [x for x in r.stderr.splitlines() if "error" in x]
    assert errors == [
        f"emit_jax.train: error: {settings}: not a stage settings file (malformed JSON: "
        "Expecting value at line 1 column 1); restore it, or rerun with --config.restart=True "
        f"to train base again (its output is moved to {w / 'replaced-<time>'}/, not deleted)"
    ], r.stderr[-3000:]
    assert settings.read_text() == "xx{not json"
    r = train(*args, "--config.restart=True")
    assert r.returncode == 0, r.stderr[-3000:]
    replaced = [n for n in os.listdir(w) if n.startswith("replaced-")]
    assert len(replaced) == 1
    assert (w / replaced[0] / "base" / "settings.json").read_text() == "xx{not json"
    assert json.loads(settings.read_text())["config"]["base"]["steps"] == 1
    assert json.loads((w / "base" / "done.json").read_text())["steps"] == 1


def test_a_damaged_workdir_tokenizer_names_the_way_forward(tmp_path):
    """29th probe U3: a damaged WORKDIR/tokenizer/tokenizer.json was refused ("cannot load a
    tokenizer (JSONDecodeError ...)") without a word on what to do; moving the folder away is
    enough (the run trains it again from the dataset's texts)."""
    import pytest

    from emit_jax.data.tokenizer import TokenizerError
    from emit_jax.training.data import tokenizer_for

    tok = tmp_path / "w" / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text('{"garbage')
    with pytest.raises(TokenizerError) as e:
        tokenizer_for(str(tmp_path / "w"), None)
    assert str(e.value).startswith(f"{tok}: cannot load a tokenizer (")
    assert str(e.value).endswith(f"; move {tok} out of the workdir and rerun: it is trained "
                                 "again from the dataset's texts, as the first run did")
    os.rename(tok, tmp_path / "old")
    assert tokenizer_for(str(tmp_path / "w"), None).pad_token_id is not None


def test_plan_refuses_a_mesh_the_batch_does_not_split_over(capsys):
    """29th probe S1: ``plan --mesh data=3`` on a 32-row batch planned "32 per device" and each
    device's memory as the whole, without a word; the trainer refuses that mesh."""
    from emit_jax.plan.command import main

    assert main(["--config", "configs/grpo.py:smoke", "--mesh", "data=3"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == ["emit_jax.plan: error: config warmup.batch_size: 32 rows do not split over "
                   "the mesh's 3 batch shards (data 3 x fsdp 1 of 3 devices); use a multiple of "
                   "3 or change config.mesh"], err
    assert main(["--config", "configs/grpo.py:smoke", "--mesh", "data=2"]) == 0
    assert "step: 32 sequences (16 per device)" in capsys.readouterr().out
