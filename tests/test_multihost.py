"""Multihost: ``launch/local.sh`` starts 2 processes x 4 simulated CPU devices (gloo
collectives) running stage 1 and a few GRPO steps of the main job; the result matches the same
job in one process with 8 devices, and its checkpoints restore in this 1-device process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import in_model_save, train_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["-m", "emit_jax.train", "--config", "configs/grpo.py:smoke",
        "--config.mesh.data=2", "--config.mesh.tensor=2", "--config.stages=('sft','grpo')",
        "--config.sft.steps=1", "--config.grpo.steps=2", "--config.grpo.max_new_tokens=6",
        "--config.eval_limit=0", "--config.export_hf=False", "--config.image_size=56",
        "--config.compile_cache=",
        # BatchNorm in train mode: with grpo.bn=frozen the two smoke steps' loss is float32
        # cancellation (ratio 1, advantages summing to 0) and the soft prompt's gradient is noise
        # that Adam scales to a full step, so the two runs could not be told apart from noise
        "--config.grpo.bn=train"]


def _env(**kw):
    # compile_cache="" too: two processes writing one persistent cache at once gain nothing
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **kw)
    for k in ("EMIT_COORDINATOR", "EMIT_NUM_PROCESSES", "EMIT_PROCESS_ID"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    multi, single = str(tmp / "two_processes"), str(tmp / "one_process")
    # both runs at once: the two-process run waits on gloo often enough to share the cores
    log_dir = tmp / "logs"
    multi_p = subprocess.Popen(
        ["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "-d", "4", "--cpu", "--",
         sys.executable, *ARGS, "--workdir", multi],
        cwd=ROOT, env=_env(LOG_DIR=str(log_dir)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    single_p = subprocess.Popen([sys.executable, *ARGS, "--workdir", single], cwd=ROOT,
                                env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    multi_out, _ = multi_p.communicate(timeout=900)
    _, single_err = single_p.communicate(timeout=900)
    logs = "".join(open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir)))
    assert multi_p.returncode == 0, multi_out[-2000:] + logs[-4000:]
    assert single_p.returncode == 0, single_err[-3000:]
    return multi, single, logs


def _params(path):
    from flax import nnx

    from emit_jax import checkpoint

    model, _ = checkpoint.load_model(path)  # written over 8 devices, restored on 1
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model))}


def _metrics(workdir, stage):
    with open(os.path.join(workdir, stage, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_two_processes_match_one(runs):
    multi, single, logs = runs
    assert "over 8 devices, 2 process(es)" in logs
    # stage 1 loaded per process: each its own half of the 8-row batch (data 2 x fsdp 2 shards)
    assert "process 0 loads rows 0-3 of each 8-row batch" in logs
    assert "process 1 loads rows 4-7 of each 8-row batch" in logs
    ms, ss = _metrics(multi, "sft"), _metrics(single, "sft")
    assert ms[0]["loss"] == pytest.approx(ss[0]["loss"], rel=1e-5)
    # the same GRPO steps: losses and rewards agree (float32 sums in another order)
    m, s = _metrics(multi, "grpo"), _metrics(single, "grpo")
    assert [r["step"] for r in m] == [r["step"] for r in s] == [1, 2]
    for a, b in zip(m, s):
        assert a["reward"] == b["reward"] and a["resampled"] == b["resampled"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-8)
    # the final (merged) models agree to 1e-5; GRPO moved the parameters by far more than that
    pm, ps = _params(os.path.join(multi, "grpo", "model")), _params(os.path.join(single, "grpo", "model"))
    before = _params(os.path.join(single, "sft", "model"))
    assert pm.keys() == ps.keys()
    diff, worst = max((float(np.abs(pm[k] - ps[k]).max()), k) for k in pm)
    moved, most = max((float(np.abs(ps[k] - before[k]).max()), k) for k in ps if k in before)
    assert diff <= 1e-5 and moved > 100 * diff, (diff, worst, moved, most)
    # process 0 alone wrote the metrics (one line per step, not two)
    assert len(_metrics(multi, "sft")) == 1


def test_training_checkpoint_restores_on_another_device_count(runs):
    """The stage's Orbax training checkpoint (written by 2 processes over 8 devices) restores
    into a 1-device model here."""
    import importlib.util

    from flax import nnx

    from emit_jax import checkpoint
    from emit_jax.training.config import OptimConfig
    from emit_jax.training.optim import make_optimizer
    from emit_jax.training.state import StageCheckpoints

    spec = importlib.util.spec_from_file_location("grpo_config", os.path.join(ROOT, "configs", "grpo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config("smoke")
    cfg.sft.steps = 1
    multi, _, _ = runs
    model, _ = checkpoint.load_model(os.path.join(multi, "sft", "model"))
    wrt = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("soft_prompt"), nnx.PathContains("projector")))
    opt = nnx.Optimizer(model, make_optimizer(OptimConfig.from_section(cfg.sft, "sft")), wrt=wrt)
    ck = StageCheckpoints(os.path.join(multi, "sft", "ckpt"), every=1)
    meta = ck.restore(model, opt)
    ck.close()
    assert meta["step"] == 1
    assert int(opt.step[...]) == 1


# ------------------------------------------------------------------ preemption, two processes
# A scheduler may signal the processes of one job at different times, or only one of them. The
# stop flag is agreed every step (emit_jax.training.loop.stop_requested), so SIGTERM to
# process 1 alone stops both after the same step, with that step saved by both; the same command
# run again resumes there and finishes, every step logged once.
PREEMPT_ARGS = ["-m", "emit_jax.train", "--config", "configs/grpo.py:smoke",
                "--config.mesh.data=2", "--config.stages=('sft',)", "--config.sft.steps=12",
                "--config.checkpoint_every=1000", "--config.log_every=1", "--config.eval_limit=0",
                "--config.export_hf=False", "--config.image_size=56", "--config.compile_cache="]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, port):
    procs = []
    for i in range(2):
        env = _env(PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
        env.update(EMIT_COORDINATOR=f"127.0.0.1:{port}", EMIT_NUM_PROCESSES="2",
                   EMIT_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, *PREEMPT_ARGS, "--workdir", str(workdir)],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def test_sigterm_to_one_process_stops_both_after_the_same_saved_step(tmp_path):
    import signal
    import threading
    import time

    w = tmp_path / "preempt"
    p0, p1 = _two_processes(w, _free_port())
    err1: list[str] = []
    drain = threading.Thread(target=lambda: err1.append(p1.stderr.read()), daemon=True)
    drain.start()  # process 1's stderr must not fill its pipe while we read process 0's
    lines, t = [], None
    for line in p0.stderr:
        lines.append(line)
        if t is None and line.startswith("[sft] step 2/"):
            p1.send_signal(signal.SIGTERM)  # process 1 only
            t = time.time()
    rc0, rc1 = p0.wait(timeout=300), p1.wait(timeout=300)
    secs = time.time() - t if t else None
    drain.join(timeout=60)
    err0 = "".join(lines)
    assert t is not None, err0[-3000:]
    assert rc0 == rc1 == 130, (rc0, rc1, err0[-3000:], "".join(err1)[-3000:])
    assert secs < 120, secs  # a step or two (the flag is agreed at the next boundary) + a save
    assert "interrupted (sft: stopped after step" in err0
    stopped = int(err0.split("sft: stopped after step ")[1].split(")")[0])
    assert 2 <= stopped < 12
    ckpt = sorted(os.listdir(w / "sft" / "ckpt"))
    assert str(stopped) in ckpt, ckpt  # checkpoint_every=1000: only the preemption save
    assert not (w / "sft" / "done.json").exists()
    # the same command again: resumes after that step and finishes; each step logged once
    q0, q1 = _two_processes(w, _free_port())
    out0, out1 = q0.communicate(timeout=600), q1.communicate(timeout=600)
    assert q0.returncode == q1.returncode == 0, (out0[1][-3000:], out1[1][-3000:])
    steps_logged = [int(line.split("/")[0].split()[-1]) for line in out0[1].splitlines()
                    if line.startswith("[sft] step ")]
    assert steps_logged[0] == stopped + 1 and steps_logged[-1] == 12, steps_logged
    assert [r["step"] for r in _metrics(str(w), "sft")] == list(range(1, 13))


def test_stage_1_starts_with_its_embedding_sharded_over_processes(tmp_path):
    """Nineteenth probe MP1: ``local.sh -n 2`` with the default mesh (fsdp over both processes)
    crashed in stage 1's ``EMIT.create`` on both processes ("Fetching value for jax.Array that
    spans non-addressable devices"): the soft prompt's initial rows were read from the whole
    embedding table with ``np.asarray``. Only the hint's rows are gathered now. (A stage 1
    started from random weights held the table on each process: the base stage's model, as
    trained, is what is sharded.)"""
    log_dir = tmp_path / "logs"
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "--cpu", "--",
         sys.executable, "-m", "emit_jax.train", "--config", "configs/grpo.py:smoke",
         "--workdir", str(tmp_path / "w"), "--config.stages=('base','sft')",
         "--config.base.steps=1", "--config.sft.steps=1",
         "--config.sft.fresh_datasets=0", "--config.eval_limit=0", "--config.export_hf=False",
         "--config.image_size=56", "--config.compile_cache="],
        cwd=ROOT, env=_env(LOG_DIR=str(log_dir), EMIT_JAX_CACHE=str(tmp_path / "cache")),
        capture_output=True, text=True, timeout=900)
    logs = "".join(open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir)))
    assert r.returncode == 0, r.stdout[-2000:] + logs[-4000:]
    assert "[mesh] {'data': 1, 'fsdp': 2, 'tensor': 1} over 2 devices, 2 process(es)" in logs
    assert os.path.isfile(tmp_path / "w" / "sft" / "done.json")


LATE_SIGNAL = """
import sys
from emit_jax import parallel
parallel.initialize()
import jax
from emit_jax.training import loop
try:
    with loop.guard():
        for step in range(3):
            if loop.stop_requested():
                raise loop.Preempted("stopped after step %d" % step)
        if jax.process_index() == 1:  # a SIGTERM after the loop's last check, on one process
            loop.request_stop()
    print("went on", flush=True)
except KeyboardInterrupt as e:
    print("stopped:", e, flush=True)
"""


def test_a_stop_after_the_last_check_on_one_process_stops_every_process(tmp_path):
    """Twentieth probe C54: SIGTERM to one of two processes in a stage's last step (after the
    loop's last agreed check) stopped that process only; the other went on into the next
    stage's collectives and both waited for ever. The loop's end agrees on it now."""
    log_dir = tmp_path / "logs"
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "--cpu", "--",
         sys.executable, "-c", LATE_SIGNAL],
        cwd=ROOT, env=_env(LOG_DIR=str(log_dir)), capture_output=True, text=True, timeout=300)
    logs = [open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir))]
    assert r.returncode == 0, r.stdout[-2000:] + "".join(logs)[-3000:]
    assert all("stopped: signal during the last step" in log for log in logs), logs


def _two_of(script: str, log_dir, *, kill_grace: int):
    """``launch/local.sh -n 2 --cpu -- python -c script``: (CompletedProcess, seconds, the
    processes' logs)."""
    import time

    t = time.time()
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "--cpu", "--",
         sys.executable, "-c", script],
        cwd=ROOT, env=_env(LOG_DIR=str(log_dir), KILL_GRACE=str(kill_grace)),
        capture_output=True, text=True, timeout=280)
    secs = time.time() - t
    return r, secs, [open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir))]


# a process of two that ends alone, the other waiting for it in a collective: process 1 stops
# (a signal that came outside the training loop), process 0 ignores SIGTERM so that it ends on
# its own, through the collective's failure
ALONE = """
import signal
from emit_jax import cli, parallel
parallel.initialize()
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
multihost_utils.process_allgather(jnp.ones(2))  # both connected
if jax.process_index() == 1:
    print("process 1 stops", flush=True)
    cli.end(130)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
try:
    multihost_utils.process_allgather(jnp.ones(2))  # process 1 never comes
    print("went on", flush=True)
except Exception as e:
    print("error:", cli.runtime_error(e), flush=True)
    cli.end(2)
"""


def test_a_process_that_ends_alone_does_not_wait_for_the_others(tmp_path):
    """Twenty-first probe: SIGTERM to one of two processes after training (in the held-out
    evaluation) printed its line, and the process then waited in jax's ``distributed.shutdown``
    barrier (Python's exit) for process 0, which waited for it in its next collective: neither
    ended, nor did ``launch/local.sh`` (the failed process never exited). A process that ends
    with a failure gives the barrier 10 s (``parallel.distributed.leave``) and then ends; the
    other's collective then fails, which is one line naming what happened."""
    r, secs, logs = _two_of(ALONE, tmp_path / "logs", kill_grace=120)
    # local.sh's status is the first failure it saw: both may end within one of its polls
    assert r.returncode in (2, 130), r.stderr[-2000:] + "".join(logs)[-3000:]
    assert "exit statuses 0:2 1:130" in r.stderr, r.stderr
    assert secs < 100, secs  # before: 300 s and more (the shutdown barrier's own timeout)
    assert "process 1 stops" in logs[1] and "Traceback" not in logs[1], logs[1]
    err = [line for line in logs[0].splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(
        "error: another process of this multi-process run ended or cannot be reached ("), logs[0]
    assert "Traceback" not in logs[0], logs[0]


def test_sigterm_to_one_process_after_training_ends_the_run_and_the_rerun_finishes(tmp_path):
    """Twenty-first probe, as a user met it: ``launch/local.sh -n 2``, SIGTERM to process 1
    once the stage has finished (held-out evaluation, export): local.sh ran on for ever. Now
    process 1 prints its line and ends, process 0 one line (its collective lost its peer) or
    local.sh's SIGTERM stops it; the same command again finds the stage done and finishes."""
    import signal
    import time

    w, log_dir = tmp_path / "w", tmp_path / "logs"
    cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "--cpu", "--",
           sys.executable, "-m", "emit_jax.train", "--config", "configs/grpo.py:smoke",
           "--workdir", str(w), "--config.stages=base", "--config.base.steps=1",
           "--config.eval_limit=2", "--config.image_size=56", "--config.compile_cache="]
    env = _env(LOG_DIR=str(log_dir), EMIT_JAX_CACHE=str(tmp_path / "cache"), KILL_GRACE="20")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pid1 = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None:
            if "[base] finished in" in (log_dir / "proc_0.log").read_text() \
                    if (log_dir / "proc_0.log").exists() else False:
                pid1 = _pid_of_process(1, log_dir)
                os.kill(pid1, signal.SIGTERM)
                break
            time.sleep(0.1)
        t = time.time()
        out, _ = p.communicate(timeout=200)
        secs = time.time() - t
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    logs = [open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir))]
    assert pid1 is not None, out[-2000:]
    assert p.returncode == 130 and "stopped (process 1 was interrupted first, status 130)" in out, out[-2000:]
    assert secs < 60, secs
    assert logs[1].rstrip().splitlines()[-1] == (
        "emit_jax.train: interrupted (SIGTERM); rerun the same command to resume from the last "
        "checkpoint"), logs[1][-2000:]
    assert "Traceback" not in logs[0] + logs[1], logs[0][-3000:]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[base] already finished" in open(log_dir / "proc_0.log").read()
    assert (w / "hf" / "config.json").is_file()


def _pid_of_process(i: int, log_dir) -> int:
    """The pid of the ``emit_jax.train`` process whose environment says EMIT_PROCESS_ID=i and
    LOG_DIR=log_dir: this test's, not one of another run on the host (before, a SIGTERM meant
    for this test's process 1 could reach another job's)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{name}/cmdline", "rb").read()
            environ = open(f"/proc/{name}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if (b"emit_jax.train" in cmdline and f"EMIT_PROCESS_ID={i}".encode() in environ
                and f"LOG_DIR={log_dir}".encode() in environ):
            return int(name)
    raise AssertionError(f"no emit_jax.train process {i}")


# process 1 ends at once after the work (a signal as it ended: os._exit, no shutdown); process 0
# ends normally and waits in jax's shutdown barrier for it
FINISHED = """
import os
from emit_jax import cli, parallel
parallel.initialize()
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
multihost_utils.process_allgather(jnp.ones(2))
if jax.process_index() == 1:
    print("process 1 gone", flush=True)
    os._exit(130)
cli.finishing("emit_jax.train", 0)
print("process 0 done", flush=True)
cli.end(0)
"""


def test_a_finished_process_waiting_for_a_gone_one_hears_the_launchers_signal(tmp_path):
    """Twenty-fourth probe M3: SIGTERM to process 1 as the run ended (its work done): process 0,
    finished too, waited in jax's shutdown barrier for it (inside C++, its signal handler never
    ran), so local.sh's SIGTERM went unheard and it was killed after KILL_GRACE without a line.
    It waits in Python now: the SIGTERM ends it at once with its line."""
    r, secs, logs = _two_of(FINISHED, tmp_path / "logs", kill_grace=60)
    assert "exit statuses 0:130 1:130" in r.stderr, r.stderr + "".join(logs)[-3000:]
    assert "did not stop" not in r.stderr and secs < 50, (secs, r.stderr)
    assert logs[0].rstrip().splitlines()[-1] == (
        "emit_jax.train: interrupted (SIGTERM) as it ended; it had finished, and what it wrote "
        "is complete"), logs[0]


# the process's own SIGTERM handler, installed before jax.distributed starts, is the one a
# SIGTERM meets after it (not jax's preemption notifier)
OWN_HANDLER = """
import os, signal, time
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
from emit_jax import cli, parallel
parallel.initialize()
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
multihost_utils.process_allgather(jnp.ones(2))
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
print("handled" if got else "not handled", flush=True)
multihost_utils.process_allgather(jnp.ones(2))
cli.end(0)
"""


def test_a_sigterm_after_jax_distributed_starts_reaches_the_process_handler(tmp_path):
    """Twenty-sixth probe MC1/MC2: jax's preemption service replaced the process's SIGTERM
    handler when ``jax.distributed`` started, so a SIGTERM to one of two ``local.sh`` workers
    outside the training loop (before its first step, or in the evaluation of a finished
    workdir) was caught by jax (``preemption_notifier.cc: SIGTERM caught``) and ignored: the
    worker trained, evaluated and exported to the end, exit 0, without a word."""
    r, _, logs = _two_of(OWN_HANDLER, tmp_path / "logs", kill_grace=30)
    assert r.returncode == 0, r.stderr[-2000:] + "".join(logs)[-3000:]
    for log in logs:
        assert "handled" in log and "not handled" not in log, log[-2000:]
        assert "SIGTERM caught" not in log, log[-2000:]


ANY_PROCESS = """
from emit_jax import cli, parallel
parallel.initialize()
import jax
print("any", parallel.any_process(jax.process_index() == 1), parallel.any_process(False),
      flush=True)
cli.end(0)
"""


def test_any_process_agrees_on_one_branch(tmp_path):
    """``parallel.any_process``: the flag of any process, on every process (a rerun's export
    decision reads files each process could see differently; they must take one branch)."""
    r, _, logs = _two_of(ANY_PROCESS, tmp_path / "logs", kill_grace=30)
    assert r.returncode == 0, r.stderr[-2000:] + "".join(logs)[-3000:]
    assert all("any True False" in log for log in logs), logs


def test_a_worker_killed_as_the_last_checkpoint_is_awaited_ends_the_run_in_lines(tmp_path):
    """Twenty-seventh probe MK2/MK3: ``kill -9`` of worker 1 while the stage's last checkpoint
    was awaited (after the loop): worker 0 waited for its write, which waits for every process,
    holding back local.sh's SIGTERM, until SIGKILL after ``KILL_GRACE`` (or jax's heartbeat
    timeout: tracebacks and "Fatal Python error: Aborted"). It now stops ``PEER_WAIT`` seconds
    after the signal, in one line; the rerun resumes."""
    import time

    w, log_dir = tmp_path / "w", tmp_path / "logs"
    train = (f"{sys.executable} -m emit_jax.train --config configs/grpo.py:smoke --workdir {w} "
             "--config.stages=base --config.base.steps=2 --config.checkpoint_every=1 "
             "--config.eval_limit=0 --config.export_hf=False --config.image_size=56 "
             "--config.compile_cache=")
    script = ('if [ "$EMIT_PROCESS_ID" = 1 ]; then export EMIT_FAULTS=kill_in_close@base:2; '
              f'fi; exec {train}')
    env = _env(LOG_DIR=str(log_dir), EMIT_JAX_CACHE=str(tmp_path / "cache"), KILL_GRACE="40")
    t = time.time()
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "--cpu",
                        "--", "bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    secs = time.time() - t
    logs = [open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir))]
    assert "process 1 exited with status 137" in r.stderr, r.stderr + logs[0][-2000:]
    assert "did not stop" not in r.stderr, (secs, r.stderr)
    last = logs[0].rstrip().splitlines()[-1]
    assert last == ("emit_jax.train: interrupted (SIGTERM while the stopping step's checkpoint "
                    "was written): stopped at once; rerun the same command to resume from the "
                    "last complete checkpoint"), logs[0][-3000:]
    assert "Traceback" not in logs[0] and "Fatal Python error" not in logs[0], logs[0][-3000:]
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "--cpu",
                        "--", "bash", "-c", f"exec {train}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]



def test_a_process_whose_peer_is_gone_ends_at_once(monkeypatch):
    """Twenty-seventh probe MB6: a process whose collective lost its peer printed its line and
    then waited in jax's shutdown barrier, which cannot pass with a process gone (and where,
    with the coordinator gone, jax's client aborts it). ``cli.peer_lost`` marks it, and
    ``leave`` ends it at once; other failures still give the barrier its time."""
    from emit_jax import cli
    from emit_jax.parallel import distributed

    monkeypatch.setattr(distributed, "_STARTED", True)
    monkeypatch.setattr(distributed, "_PEER_LOST", False)
    assert cli.peer_lost(RuntimeError("something else")) is None and not distributed._PEER_LOST
    line = cli.peer_lost(RuntimeError("UNKNOWN: Gloo AllGather failed: Connection closed by peer"))
    assert line and line.startswith("another process of this multi-process run ended"), line
    assert distributed._PEER_LOST
    started = []
    monkeypatch.setattr(distributed.jax.distributed, "shutdown", lambda: started.append(1))
    assert distributed.leave(2) is False and started == []  # at once, no shutdown


# worker 1 gets SIGUSR1 (SLURM's pre-emption warning) as the finished stage's model is written
SIGNAL_IN_A_SHARED_MODEL_SAVE = train_script(in_model_save(
    "os.environ.get('EMIT_PROCESS_ID') == '1' and os.kill(os.getpid(), signal.SIGUSR1)"))


def test_a_signal_to_one_worker_as_the_model_is_written_is_lines_and_the_rerun_finishes(tmp_path):
    """Twenty-seventh probe N7: SIGUSR1 to worker 1 while the stage's model was written (the
    write shared by both processes) was raised into Orbax's save; worker 1's cleanup removed
    the shared folder worker 0 was still writing, and worker 0 ended in 25 tracebacks and an
    uncaught one through the tool's code, without a line. Now the signalled worker finishes its
    part first (or stops after ``PEER_WAIT``), the others end in their lines, and the rerun
    saves the model from the stage's last checkpoint."""
    w, log_dir = tmp_path / "w", tmp_path / "logs"
    args = ["--config", "configs/grpo.py:smoke", "--workdir", str(w), "--config.stages=base",
            "--config.base.steps=1", "--config.eval_limit=0", "--config.export_hf=False",
            "--config.image_size=56", "--config.compile_cache="]
    env = _env(LOG_DIR=str(log_dir), EMIT_JAX_CACHE=str(tmp_path / "cache"), KILL_GRACE="40")
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "--cpu",
                        "--", sys.executable, "-c", SIGNAL_IN_A_SHARED_MODEL_SAVE, *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = [open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir))]
    assert r.returncode != 0 and "did not stop" not in r.stderr, r.stderr
    assert logs[1].rstrip().splitlines()[-1].endswith(
        "interrupted (SIGUSR1); rerun the same command to resume from the last checkpoint"), \
        logs[1][-3000:]
    for log in logs:
        assert "Traceback" not in log and "Fatal Python error" not in log, log[-3000:]
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "--cpu",
                        "--", sys.executable, "-m", "emit_jax.train", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (w / "base" / "model" / "emit_jax.json").is_file()


# local.sh stopping a job while process 1 waits in a barrier and process 0 is still in Python
# work before it (process 0 has more of it: the finished stage's old model removed, logs)
IN_A_BARRIER = """
import os, signal, threading, time
from emit_jax import cli, parallel
parallel.initialize()
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
multihost_utils.process_allgather(jnp.ones(2))  # both connected
sent = []


def stop():  # as local.sh stops the job: a SIGTERM to every process
    sent.append(time.time())
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv):
    threading.Timer(3.0, stop).start()
    if jax.process_index() == 0:
        time.sleep(60)
    parallel.barrier("after process 0's work")
    print("went on", flush=True)


status = cli.run(main, prog="probe")
together = cli.may_exit(status)
print(f"ended {status} after {time.time() - sent[0]:.1f} s, together {together}", flush=True)
cli.flush_and_exit(status)
"""


def test_a_process_in_a_barrier_hears_the_launchers_signal(tmp_path):
    """Twenty-ninth probe U2: three processes, Ctrl-C to local.sh just after a stage's last
    step: the stop took 10.5 s and local.sh SIGKILLed two processes. Processes 1 and 2 were in
    the barrier before the stage's model is written, deaf to the SIGTERM inside C++, while
    process 0, still before it, stopped and waited 10 s for them in jax's shutdown (then ended
    alone). A barrier now waits with the signal handlers running: every process stops at once,
    and they end together."""
    r, secs, logs = _two_of(IN_A_BARRIER, tmp_path / "logs", kill_grace=60)
    assert "exit statuses 0:130 1:130" in r.stderr, r.stderr + "".join(logs)[-3000:]
    for log in logs:
        ended = [line for line in log.splitlines() if line.startswith("ended ")]
        assert len(ended) == 1, log[-2000:]
        assert ended[0].endswith("together True"), log[-2000:]
        assert float(ended[0].split()[3]) < 5.0, log[-2000:]  # before: 10 s, then killed
        assert "went on" not in log and "Traceback" not in log, log[-2000:]
