"""Integration: a few steps of every stage of the main job on the tiny config (CI), resume by
rerunning the same command (also after kill -9 / SIGTERM at four points: bit-identical
parameters), non-finite steps through the command line, and the Table 1 driver."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, interruptible, subprocess_env, train


@pytest.fixture(scope="module")
def run_dir(smoke_run):
    return smoke_run


def test_all_stages_run_and_export(run_dir):
    d, _, r = run_dir
    for stage in ("warmup", "base", "sft", "grpo"):
        assert os.path.isfile(d / stage / "done.json"), stage
        assert os.path.isfile(d / stage / "model" / "emit_jax.json"), stage
    assert "held-out test split" in r.stdout and "Average" in r.stdout
    res = json.loads((d / "results.json").read_text())
    assert set(res["stages"]) == {"warmup", "base", "sft", "grpo"}
    hist = res["stages"]["grpo"]["history"]
    assert len(hist) == 2 and all(k in hist[0] for k in ("reward", "acc", "kl", "resampled",
                                                          "entropy", "clip_frac"))
    # mu = 2: the second update of a batch sees a policy that moved since sampling
    assert all(h["ratio_mean"] != 1.0 for h in hist)
    assert any(k.startswith("acc/") for k in hist[0])
    # where the advantage mass lies (rl.grpo.advantage_mass): groups by correct count
    for h in hist:
        by_k = [h[k] for k in sorted(h) if k.startswith("groups_correct_")]
        assert len(by_k) >= 3 and sum(by_k) >= 1, h
        assert 0.0 <= h["adv_abs_hard"] <= h["adv_abs"], h
    # what a user sees: TensorBoard events per stage, curves and the results table as PNG
    for stage in ("warmup", "base", "sft", "grpo"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(d / stage / "tb")), stage
    for png in ("curves.png", "results.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(d / "hf" / "config.json") and os.path.isfile(d / "hf" / "emit_extras.safetensors")
    assert os.path.isfile(d / "hf" / "tokenizer.json")


def test_the_recipes_length_buckets_fit_the_embedded_sequences(run_dir):
    """The embedded recipe pads the sequences stage 1 trains on and the held-out questions to
    392 tokens (``embedded_recipe``; 512 before, a third more LLM work for them), and leaves
    the base stage's and stage 2's longer ones at 512: the smoke run's records, encoded as its
    stages encode them, fit 392 and not much less (a prompt change that outgrows it shows
    here, not as a silent slowdown), and the base stage's and stage 2's do not, mostly."""
    from emit_jax import configs
    from emit_jax.data.pipeline import RecordEncoder
    from emit_jax.data.tokenizer import load_tokenizer
    from emit_jax.training.stages import load_stage, pipeline_config

    d, _, _ = run_dir
    cfg = configs.load(os.path.join(ROOT, "configs", "grpo.py"), {})
    short = cfg.data.length_buckets[0]
    assert cfg.data.length_buckets == (392, 512, 768, 1024, 1536, 2048, 4096)
    model, tok = load_stage(str(d), "sft"), load_tokenizer(str(d / "tokenizer"))
    rng = np.random.default_rng(0)

    def lengths(name, with_answer):
        recs = [json.loads(x) for x in (d / "data" / f"{name}.jsonl").read_text().splitlines()]
        enc = RecordEncoder(tok, pipeline_config(cfg, model, with_answer=with_answer))
        return np.array([len(enc(r, rng)["input_ids"]) for r in recs])

    for name, with_answer in (("sft", True), ("validation", False), ("test", False)):
        n = lengths(name, with_answer).max()
        assert short - 32 < n <= short, (name, n)
    assert np.median(lengths("base", True)) > short
    assert np.median(lengths("grpo", False)) > short


def test_rerun_resumes_and_skips_finished_stages(run_dir):
    d, cache, _ = run_dir
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(d),
              "--config.eval_unseen=1", "--config.eval_unseen_limit=6",
              env={"EMIT_JAX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-4000:]
    for stage in ("warmup", "base", "sft", "grpo"):
        assert f"[{stage}] already finished" in r.stderr
    # the unseen-datasets evaluation: 6 of the questions of embedded seed 1000's images, drawn
    # from all four tasks (the embedded recipe's eval_unseen_tasks=())
    assert "held-out: 1 embedded dataset(s) no stage saw (seeds 1000-1000), 6 questions (a " \
        "fixed random subset)" in r.stdout
    res = json.loads((d / "results.json").read_text())
    assert res["unseen_questions"] == 6
    four = {"Anomaly Discrimination", "Defect Classification", "Defect Localization",
            "Object Classification"}
    assert res["unseen_tasks"] and set(res["unseen_tasks"]) <= four, res["unseen_tasks"]
    # (balanced AD accuracy is undefined when the subset's AD questions are of one label only)
    assert all(v != v or 0.0 <= v <= 100.0 for v in res["unseen_tasks"].values())


def test_more_steps_continue_from_the_last_checkpoint(tmp_path, run_dir):
    _, cache, _ = run_dir
    d = tmp_path / "w"
    # the smoke run's warm-up stage (its compiled step is in the session's compilation cache)
    common = ["--config", "configs/grpo.py:smoke", "--workdir", str(d),
              "--config.stages=('warmup',)", "--config.eval_limit=0", "--config.export_hf=False"]
    r1 = train(*common, "--config.warmup.steps=2", env={"EMIT_JAX_CACHE": str(cache)})
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = train(*common, "--config.warmup.steps=4", env={"EMIT_JAX_CACHE": str(cache)})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "[warmup] step 3/4" in r2.stderr and "[warmup] step 1/4" not in r2.stderr
    steps = [json.loads(l)["step"] for l in (d / "warmup" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_table1_reuses_shared_stages_and_reports_mean_std(tmp_path, run_dir):
    """The Table 1/2 driver: rows that share stages reuse them (here: the finished smoke run's),
    the SFT-instead-of-GRPO row trains ``sft2`` (LoRA), and the table holds every row."""
    d, cache, _ = run_dir
    common = tmp_path / "t1" / "seed0" / "common"
    common.mkdir(parents=True)
    for name in ("warmup", "base", "sft", "tokenizer", "data"):
        os.symlink(d / name, common / name)
    rows = "base model,+ stage 1 (SP + CE),+ SFT instead of GRPO"
    r = subprocess.run([sys.executable, "-m", "emit_jax.experiments.table1", "--seeds", "1",
                        "--workdir", str(tmp_path / "t1"), "--config", "configs/grpo.py:smoke",
                        "--rows", rows, "--set", "sft2.steps=2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1500, env=subprocess_env(EMIT_JAX_CACHE=str(cache)))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "[warmup] already finished" in r.stderr and "[sft2] step 2/2" in r.stderr
    out = json.loads((tmp_path / "t1" / "table1.json").read_text())
    assert [x["row"] for x in out["runs"]] == rows.split(",")
    for row in rows.split(","):
        assert f"| {row} |" in r.stdout
        vals = out["rows"][row]["Average"]["values"]
        assert len(vals) == 1 and out["rows"][row]["Average"]["std"] == 0.0
    assert os.path.isfile(tmp_path / "t1" / "seed0" / "sft2" / "sft2" / "model" / "emit_jax.json")


def test_table1_summary_is_mean_and_std_over_seeds():
    import numpy as np

    from emit_jax.experiments.table1 import summarize

    runs = [{"row": "+ GRPO", "seed": s, "average": a,
             "tasks": {"Anomaly Discrimination": ad, "Defect Classification": 25.0}}
            for s, a, ad in ((0, 40.0, 60.0), (1, 50.0, 70.0), (2, 45.0, 80.0))]
    table, data = summarize(runs)
    ad = data["+ GRPO"]["Anomaly Discrimination"]
    assert ad["mean"] == pytest.approx(70.0) and ad["std"] == pytest.approx(np.std([60, 70, 80]))
    assert "70.0 ± 8.2" in table and "3 seed(s)" in table
    assert "Object Classification" not in data["+ GRPO"]
    assert "collapsed" not in table
    runs[1]["letters"], runs[2]["letters"] = {"A": 30}, {"A": 20, "C": 10}
    assert "collapsed model): + GRPO (seed 1: A)" in summarize(runs)[0]
    assert "unseen" not in table
    for r, u in zip(runs, (55.0, 65.0, 60.0)):  # with eval_unseen: one more column
        r.update(unseen_ad=u, unseen_questions=392)
    table, data = summarize(runs)
    assert data["+ GRPO"]["AD, unseen images"]["mean"] == pytest.approx(60.0)
    assert "| 60.0 ± 4.1 |" in table and "392 questions" in table


def test_table1_stage2_diagnostics(tmp_path):
    """What each GRPO row's stage 2 did, read from its done.json: the first round's groups
    with no correct completion (resampled ones for difficulty-aware GRPO, kept ones for plain
    GRPO), rescued groups, the hard groups' share of |A|, training accuracy early and late."""
    from emit_jax.experiments.table1 import diagnostics, stage2_diagnostics

    hist = [{"acc": a, "adv_abs": 4.0, "adv_abs_hard": h} for a, h in
            [(0.25, 3.0)] * 10 + [(0.5, 1.0)] * 10]
    emit = {"counts": {"groups": 80, "groups_resampled": 20, "groups_recovered": 15,
                       "groups_without_correct": 5, "rounds_made": 30}, "history": hist}
    d = stage2_diagnostics(emit)
    assert d["no_correct_first"] == 25.0 and d["rescued"] == 15 and d["no_correct_trained"] == 5
    assert d["hard_share"] == 50.0 and d["acc_first"] == 25.0 and d["acc_last"] == 50.0
    plain = {"counts": {"groups": 80, "groups_without_correct": 12}, "history": hist[:1]}
    d = stage2_diagnostics(plain)
    assert d["no_correct_first"] == 15.0 and d["resampled"] == d["rescued"] == 0
    assert d["hard_share"] == 75.0
    old = {"counts": {"groups": 80}, "history": [{"acc": 0.5}]}  # before |A| was logged
    assert stage2_diagnostics(old)["hard_share"] is None
    for seed, done in ((0, emit), (1, plain)):
        os.makedirs(tmp_path / f"seed{seed}" / "grpo_emit" / "grpo")
        (tmp_path / f"seed{seed}" / "grpo_emit" / "grpo" / "done.json").write_text(
            json.dumps(done))
    results = [{"row": "+ difficulty-aware GRPO", "seed": s} for s in (0, 1)] + [
        {"row": "+ GRPO", "seed": 0}]  # its folder is missing: left out
    text = diagnostics(str(tmp_path), results)
    line = next(x for x in text.splitlines() if x.startswith("| + difficulty-aware GRPO |"))
    assert "| 20.0 ± 5.0 | 10.0 ± 10.0 | 7.5 ± 7.5 |" in line and "| 62.5 ± 12.5 |" in line
    assert "| + GRPO |" not in text
    assert diagnostics(str(tmp_path), [{"row": "base model", "seed": 0}]) == ""


def test_table1_row_stages():
    from emit_jax.experiments.table1 import row_stages

    full = ("warmup", "base", "sft", "grpo")
    assert row_stages(full, "base") == ("warmup", "base")
    assert row_stages(full, "sft") == ("warmup", "base", "sft")
    assert row_stages(full, "sft2") == ("warmup", "base", "sft", "sft2")
    assert row_stages(("base", "sft", "grpo"), "grpo") == ("base", "sft", "grpo")


# ------------------------------------------------------------------ exact resume
# The main job (smoke size, every stage) is stopped three times — SIGTERM in the warm-up
# (resume inside ``run_sft``, the loop the base stage shares), ``kill -9`` while a checkpoint of
# stage 1 (the EMIT model) is being written, ``kill -9`` during GRPO — and each time the same
# command is run again. The final parameters of
# every stage are bit-identical to the uninterrupted run (``smoke_run``), and each stage's metrics
# log holds every step once.
ARGS = ["-m", "emit_jax.train", "--config", "configs/grpo.py:smoke", "--config.checkpoint_every=1",
        "--config.eval_limit=0", "--config.export_hf=False"]
STEPS = {"warmup": 2, "base": 3, "sft": 2, "grpo": 2}  # configs/grpo.py:smoke


def _start(workdir, cache, faults=""):
    env = subprocess_env(EMIT_JAX_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("EMIT_FAULTS", None)
    if faults:
        env["EMIT_FAULTS"] = faults
    return subprocess.Popen([sys.executable, *ARGS, "--workdir", str(workdir)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)


def _signal_at(proc, prefix, sig):
    """Send ``sig`` when stderr shows a line starting with ``prefix``; returns (returncode,
    stderr, seconds from the signal to the exit)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(prefix):
            proc.send_signal(sig)
            t = time.time()
            rest = proc.stderr.read()
            rc = proc.wait(timeout=300)
            return rc, "".join(lines) + rest, time.time() - t
    rc = proc.wait(timeout=300)
    raise AssertionError(f"never saw {prefix!r} (exit {rc}):\n" + "".join(lines)[-3000:])


def _params(path):
    from flax import nnx

    from emit_jax import checkpoint

    model, _ = checkpoint.load_model(path)
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def interrupted(smoke_run, tmp_path_factory):
    _, cache, _ = smoke_run
    w = tmp_path_factory.mktemp("interrupted")
    events = {}
    # 1. SIGTERM in the warm-up: stops after the step it is in, that step saved
    rc, err, secs = _signal_at(_start(w, cache), "[warmup] step 1/", signal.SIGTERM)
    events["sigterm"] = (rc, err, secs, sorted(os.listdir(w / "warmup" / "ckpt")))
    # 2. kill -9 while the checkpoint of stage 1's step 2 is being written (the base stage
    # runs through first)
    p = _start(w, cache, faults="kill_in_save@sft:2")
    _, err = p.communicate(timeout=900)
    events["kill_in_save"] = (p.returncode, err, sorted(os.listdir(w / "sft" / "ckpt")))
    # 3. kill -9 at an arbitrary point of GRPO (stage 1 resumes from step 1 first)
    events["kill_grpo"] = _signal_at(_start(w, cache), "[grpo] step 1/", signal.SIGKILL)
    p = _start(w, cache)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-4000:]
    events["final"] = err
    return w, events


def test_sigterm_saves_the_step_and_exits_promptly(interrupted):
    _, ev = interrupted
    rc, err, secs, steps = ev["sigterm"]
    assert rc == 130, err[-3000:]
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert secs < 60, secs  # bounded: the rest of one step plus one checkpoint write
    assert any(s.isdigit() and int(s) >= 1 for s in steps), steps


def test_kill_during_a_checkpoint_write_leaves_it_unused(interrupted):
    _, ev = interrupted
    rc, err, steps = ev["kill_in_save"]
    assert rc == -signal.SIGKILL, err[-3000:]
    # the write of step 2 was cut: only its temporary folder exists, never taken for a step
    assert "2" not in steps and any(s.startswith("2.") and "tmp" in s for s in steps), steps
    assert ev["kill_grpo"][0] == -signal.SIGKILL


def test_final_parameters_are_bit_identical_to_the_uninterrupted_run(interrupted, smoke_run):
    w, _ = interrupted
    ref, _, _ = smoke_run
    for stage in STEPS:
        got, want = _params(w / stage / "model"), _params(ref / stage / "model")
        assert got.keys() == want.keys(), stage
        diff = [k for k in want if not np.array_equal(got[k], want[k])]
        assert not diff, (stage, diff[:5])


def test_metrics_hold_each_step_once(interrupted):
    w, _ = interrupted
    for stage, n in STEPS.items():
        with open(w / stage / "metrics.jsonl", encoding="utf-8") as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps == list(range(1, n + 1)), (stage, steps)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_non_finite_step_is_skipped_or_stops_the_run(smoke_run, tmp_path, policy):
    """``EMIT_FAULTS=nan@sft:2`` gives stage 1's second step NaN inputs."""
    _, cache, _ = smoke_run
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(tmp_path),
              "--config.stages=('sft',)", "--config.checkpoint_every=1", "--config.eval_limit=0",
              "--config.export_hf=False", f"--config.nonfinite={policy}",
              env={"EMIT_JAX_CACHE": str(cache), "EMIT_FAULTS": "nan@sft:2"})
    with open(tmp_path / "sft" / "metrics.jsonl", encoding="utf-8") as f:
        last = [json.loads(line) for line in f][-1]
    if policy == "skip":
        assert r.returncode == 0, r.stderr[-3000:]
        assert "warning: sft: step 2 skipped, non-finite loss or gradient (1 skipped so far)" in r.stderr
        assert last["step"] == 2 and last["nonfinite_skipped"] == 1
        params = _params(tmp_path / "sft" / "model")
        assert all(np.isfinite(v).all() for v in params.values())
    else:
        assert r.returncode == 3, r.stderr[-3000:]
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("emit_jax.train: error: sft: non-finite loss or gradient at "
                                    "step 2 (nonfinite='stop'); the last good state is saved")
        assert "Traceback" not in r.stderr
        assert sorted(os.listdir(tmp_path / "sft" / "ckpt")) == ["1"]  # the last good step
        assert not os.path.exists(tmp_path / "sft" / "model")


def test_frozen_bn_keeps_stage_1_running_statistics(smoke_run):
    """``grpo.bn='frozen'`` (the tiny default): stage 2's loss uses the heat-map BatchNorm's
    running statistics and leaves them as stage 1 left them; its scale and bias still train."""
    d, _, _ = smoke_run
    sft, grpo = _params(d / "sft" / "model"), _params(d / "grpo" / "model")
    stats = [k for k in sft if k.startswith("projector/bn/") and k.endswith(("mean", "var"))]
    assert len(stats) == 2, sorted(k for k in sft if "bn" in k)
    for k in stats:
        np.testing.assert_array_equal(grpo[k], sft[k], err_msg=k)
    assert any(not np.array_equal(grpo[k], sft[k]) for k in sft if k.startswith("projector/conv"))


def test_embedded_only_options_are_logged_and_dropped_for_a_dataset_folder(capsys, tmp_path):
    import ml_collections

    from emit_jax.training.stages import embedded_only as _embedded_only

    cfg = ml_collections.ConfigDict(dict(data=dict(source="embedded")))
    assert _embedded_only(cfg, "[eval] eval_unseen", 2) is True
    assert _embedded_only(cfg, "[eval] eval_unseen", 0) is False
    assert capsys.readouterr().err == ""
    cfg.data.source = str(tmp_path)
    assert _embedded_only(cfg, "[sft] sft.fresh_datasets", 12) is False
    assert "[sft] sft.fresh_datasets=12 not used" in capsys.readouterr().err


COUNT_LETTERED = """
from emit_jax.eval import scoring
lettered = scoring.lettered
def counted(text, options):
    out = lettered(text, options)
    with open(os.environ["LETTERED_LOG"], "a") as f:
        f.write(repr((text, out)) + "\\n")
    return out
scoring.lettered = counted
"""


def test_words_answers_run_stage_2_through_the_parser(tmp_path, run_dir):
    """``data.answers='words'``: stage 2 of the smoke run again, with the four-option answers in
    words. Every completion goes through ``lettered`` (the evaluation's parser) once before the
    letter rewards and the correctness; the stage runs to its end."""
    import shutil

    from conftest import subprocess_env, train_script

    src, cache, _ = run_dir
    d = tmp_path / "w"
    d.mkdir()
    for part in ("warmup", "base", "sft", "data", "tokenizer"):
        shutil.copytree(src / part, d / part, symlinks=True)
    log = tmp_path / "lettered.log"
    r = subprocess.run([sys.executable, "-c", train_script(COUNT_LETTERED), "--config",
                        "configs/grpo.py:smoke", "--workdir", str(d),
                        "--config.data.answers=words", "--config.eval_limit=0",
                        "--config.export_hf=False"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=dict(subprocess_env(EMIT_JAX_CACHE=str(cache),
                                                            LETTERED_LOG=str(log)),
                                             PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[base] already finished" in r.stderr and "[grpo] finished" in r.stderr, r.stderr[-3000:]
    calls = [eval(line) for line in log.read_text().splitlines()]
    # each generated completion read once (all rounds; the padding rows of a round not at all),
    # its letter then serving the correctness and the rewards alike
    counts = json.loads((d / "results.json").read_text())["stages"]["grpo"]["counts"]
    assert counts["generated_groups"] >= 2 * 2  # 2 steps x 2 prompts, more with resampling
    assert len(calls) == counts["generated_groups"] * 4, (len(calls), counts)  # G 4
    import re

    for text, out in calls:  # only the last answer span changes, to the parser's letter
        spans = list(re.finditer(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", text, re.S))
        if not spans:
            assert out == text
            continue
        a, b = spans[-1].start(), spans[-1].end()
        assert out[:a] == text[:a] and out[len(out) - (len(text) - b):] == text[b:], (text, out)
        assert re.fullmatch(r"<answer>[A-E]</answer>", out[a:len(out) - (len(text) - b)]), out


def test_the_base_stage_on_an_emit_model_hands_stage_1_its_contrastive_tokens(tmp_path, run_dir):
    """``base.emit`` (off in the recipe): the base stage trains an EMIT model, its heat-map
    projector and soft prompt among its parameters, and stage 1 goes on from that model (not a
    fresh projector)."""
    import shutil

    import numpy as np
    from flax import nnx

    from emit_jax.models.emit import is_emit
    from emit_jax.training import stages

    src, cache, _ = run_dir
    d = tmp_path / "w"
    d.mkdir()
    for part in ("warmup", "data", "tokenizer"):
        shutil.copytree(src / part, d / part, symlinks=True)
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(d),
              "--config.base.emit=True", "--config.stages=(warmup,base,sft)",
              "--config.eval_limit=4", "--config.export_hf=False",
              env={"EMIT_JAX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    base = stages.load_stage(str(d), "base")
    first = stages.load_stage(str(src), "base")
    assert is_emit(base) and not is_emit(first)
    sft = stages.load_stage(str(d), "sft")

    def projector(m):
        return {k: np.asarray(v) for k, v in
                nnx.to_flat_state(nnx.state(m, nnx.All(nnx.Param, nnx.PathContains("projector"))))}
    # the base stage trained the projector from its initialisation (the same seed's, on the
    # plain base model); stage 1 went on from it
    from emit_jax import configs
    from emit_jax.data.tokenizer import load_tokenizer

    fresh = stages.as_emit(configs.load("configs/grpo.py:smoke"), first,
                           load_tokenizer(d / "tokenizer"))
    b, s0, f = projector(base), projector(sft), projector(fresh)
    assert b.keys() == f.keys() == s0.keys() and b
    assert any(not np.array_equal(b[k], f[k]) for k in b)
    assert any(not np.array_equal(b[k], s0[k]) for k in b)


def test_the_zoom_and_the_peak_region_reach_stage_2_and_the_evaluation(tmp_path, run_dir):
    """``data.zoom`` and ``data.peak_region`` (off in the recipe): stage 2 of the smoke run
    again, and its evaluation, with both on. The pairs are cut into ``WORKDIR/zoom`` as GRPO
    and the evaluation read them (a PNG crop and a JSON cell each), and the run finishes."""
    import shutil

    src, cache, _ = run_dir
    d = tmp_path / "w"
    d.mkdir()
    for part in ("warmup", "base", "sft", "data", "tokenizer"):
        shutil.copytree(src / part, d / part, symlinks=True)
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(d),
              "--config.data.zoom=0.35", "--config.data.zoom_layers=(1,2)",
              "--config.data.peak_region=True", "--config.eval_limit=12",
              "--config.export_hf=False", env={"EMIT_JAX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[sft] already finished" in r.stderr and "[grpo] finished" in r.stderr, r.stderr[-3000:]
    made = os.listdir(d / "zoom")
    crops = [n for n in made if n.endswith(".png")]
    cells = [n for n in made if n.endswith(".json")]
    assert crops and len(cells) >= len(crops)  # the DL pairs have a cell and no crop of their own
    for n in cells:
        assert 0 <= json.loads((d / "zoom" / n).read_text())["cell"] <= 8
    answers = json.loads((d / "results.json").read_text())["answers"]
    assert len(answers) == 12
