"""Reliability pieces in-process: a non-finite step leaves no trace, the skip / stop policy, an
unreadable latest checkpoint falls back to the previous one, a half-written one is never
picked up, a resumed metrics log holds each step once, and the preemption guard."""

from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from emit_jax import faults
from emit_jax.data.pipeline import IGNORE
from emit_jax.models.emit import EMIT
from emit_jax.training import loop as preemption
from emit_jax.training.metrics import MetricWriter
from emit_jax.errors import NonFiniteError
from emit_jax.training.loop import MAX_CONSECUTIVE, NonFiniteCounter
from emit_jax.training.config import OptimConfig
from emit_jax.training.optim import make_optimizer
from emit_jax.training.sft import make_train_step, to_device
from emit_jax.training.state import StageCheckpoints
from test_emit import prompt_with_slots, small_mllm


def _flat(node):
    return {k: np.array(v) for k, v in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(nnx.state(node)))}


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def emit_batch():
    model = EMIT.create(small_mllm(), hint_ids=[1])
    ids, mask = prompt_with_slots(model, [1, 1])
    labels = np.full_like(ids, IGNORE)
    labels[:, -2:] = ids[:, -2:]
    ce = np.random.RandomState(0).randn(2, 2, 3, 56, 56).astype(np.float32)
    return model, {"input_ids": ids, "labels": labels, "attention_mask": mask, "ce_pixels": ce,
                   "num_ce": np.int32(2)}


def test_a_non_finite_step_changes_nothing(emit_batch):
    base, batch = emit_batch
    model = nnx.clone(base)
    model.train()  # BatchNorm on batch statistics: a NaN batch would poison the running ones
    opt = nnx.Optimizer(model, make_optimizer(OptimConfig(steps=10, lr=1e-2, warmup_ratio=0.0)),
                        wrt=nnx.Param)
    step = make_train_step(nnx.Param)
    before_m, before_o = _flat(model), _flat(opt)
    bad = dict(batch, ce_pixels=batch["ce_pixels"] * np.float32("nan"))
    loss, _, _, ok = step(model, opt, to_device(bad))
    assert not bool(ok) and not np.isfinite(float(loss))
    assert _equal(_flat(model), before_m) and _equal(_flat(opt), before_o)  # bit for bit
    assert int(opt.step[...]) == 0  # the schedule did not advance either
    loss, _, _, ok = step(model, opt, to_device(batch))
    assert bool(ok) and np.isfinite(float(loss)) and int(opt.step[...]) == 1
    assert not _equal(_flat(model), before_m)
    assert all(np.isfinite(v).all() for v in _flat(model).values())


def test_skip_and_stop_policies():
    c = NonFiniteCounter("sft", "skip")
    assert c.record(1, True) and not c.record(2, False) and c.record(3, True)
    assert c.skipped == 1
    for s in range(MAX_CONSECUTIVE - 1):
        assert not c.record(10 + s, False)
    with pytest.raises(NonFiniteError, match=f"{MAX_CONSECUTIVE} steps in a row"):
        c.record(99, False)
    with pytest.raises(NonFiniteError, match="step 4 .nonfinite='stop'"):
        NonFiniteCounter("grpo", "stop").record(4, False)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        NonFiniteCounter("sft", "ignore")


def _linear_state(seed):
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, make_optimizer(OptimConfig(steps=4, lr=1e-2)), wrt=nnx.Param)


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    d = tmp_path / "ckpt"
    ck = StageCheckpoints(str(d), every=1, async_save=False, name="sft")
    saved = {}
    for step in (1, 2):
        model, opt = _linear_state(step)
        ck.save(step, model, opt, {"step": step, "data": {"next_index": step}})
        saved[step] = _flat(model)
    ck.close()
    # truncate every data file of step 2: present (complete rename) but unreadable
    for root, _, files in os.walk(d / "2" / "state"):
        for f in files:
            if f not in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(max(os.path.getsize(os.path.join(root, f)) // 3, 1))
    model, opt = _linear_state(7)
    ck = StageCheckpoints(str(d), every=1, async_save=False, name="sft")
    meta = ck.restore(model, opt)
    assert meta["step"] == 1 and _equal(_flat(model), saved[1])
    err = capsys.readouterr().err
    assert "warning: sft checkpoint step 2 is unreadable" in err and "trying the previous" in err
    assert "See full TensorStore details" not in err and "bound method" not in err
    aside = os.listdir(tmp_path / "ckpt-unreadable")
    assert len(aside) == 1 and aside[0].startswith("2-")  # kept, not deleted
    assert ck.save(2, model, opt, {"step": 2, "data": {}})  # the step can be written again
    ck.close()
    # the only step left unreadable too (eighth probe: "trying the previous step" when there
    # was none, then the stage started over without a word)
    _cut(d / "1")
    _cut(d / "2")
    ck = StageCheckpoints(str(d), every=1, async_save=False, name="sft")
    assert ck.restore(model, opt) is None
    ck.close()
    err = capsys.readouterr().err
    assert "warning: sft checkpoint step 2 is unreadable" in err
    assert "warning: sft checkpoint step 1 is unreadable" in err and err.rstrip().endswith(
        "no earlier checkpoint: the stage starts over from step 0"), err


def _cut(step_dir):
    """Truncate every data file of a saved step: present (complete rename) but unreadable."""
    for root, _, files in os.walk(step_dir / "state"):
        for f in files:
            if f not in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(max(os.path.getsize(os.path.join(root, f)) // 3, 1))


def test_a_half_written_checkpoint_is_never_picked_up(tmp_path):
    d = tmp_path / "ckpt"
    ck = StageCheckpoints(str(d), every=1, async_save=False)
    model, opt = _linear_state(0)
    ck.save(1, model, opt, {"step": 1, "data": {}})
    ck.close()
    # what a kill during Orbax's write leaves: the step's temporary folder, never renamed
    tmp = d / "2.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"\0" * 10)
    ck = StageCheckpoints(str(d), every=1, async_save=False)
    assert ck.latest_step == 1 and ck.restore(*_linear_state(3))["step"] == 1
    ck.close()


def test_resumed_metrics_log_holds_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"stage": "sft", "step": s, "loss": 1.0}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + "\n" + '{"stage": "sft", "st')  # cut off by a kill
    w = MetricWriter(str(tmp_path), stage="sft", total_steps=8, start_step=3, tensorboard=False,
                     progress=False)
    w.write(4, {"loss": 0.5})
    w.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_preemption_guard_turns_a_signal_into_a_stop_at_the_step_boundary():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever pytest got
    try:
        with pytest.raises(preemption.Preempted):
            with preemption.guard():
                os.kill(os.getpid(), signal.SIGTERM)  # handled: no exception here
                assert preemption.stop_requested()
                raise preemption.Preempted("stopped after step 1")
        assert not preemption.stop_requested()  # cleared for the next stage
        # SIGHUP (a closed terminal, a dropped ssh session) and SIGUSR1 (SLURM's pre-emption
        # warning) too: before, they killed the run at once, the step in progress unsaved
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            with pytest.raises(preemption.Preempted):
                with preemption.guard():
                    os.kill(os.getpid(), sig)
                    assert preemption.stop_requested()
                    raise preemption.Preempted("stopped after step 1")
            assert not preemption.stop_requested()
        # a signal after the loop's last check still stops the run when the loop ends
        with pytest.raises(KeyboardInterrupt, match="during the last step"):
            with preemption.guard():
                os.kill(os.getpid(), signal.SIGINT)
        # outside a guarded loop the previous behaviour is back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # a SIGINT the process ignores (a background job's) stays ignored inside the guard
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with preemption.guard():
            os.kill(os.getpid(), signal.SIGINT)
            assert not preemption.stop_requested()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_fault_specs(monkeypatch):
    monkeypatch.setenv("EMIT_FAULTS", "nan@sft:3,kill_in_save@base:2")
    assert not faults.fires("nan", "sft", 2)
    assert faults.fires("nan", "sft", 3) and not faults.fires("nan", "sft", 3)  # once
    monkeypatch.setenv("EMIT_FAULTS", "nan-sft-3")
    with pytest.raises(ValueError, match="is not KIND@STAGE:STEP"):
        faults.fires("nan", "sft", 3)
