"""The one training loop every stage runs (SFT-type stages and GRPO), and its guards.

A stage supplies a :class:`Stage`: its data (an iterator with ``get_state`` / ``set_state``,
saved in every checkpoint), its step (``step(n, batch) -> StepResult``) and how a log line
summarises the steps since the last one. :func:`run_loop` does the rest, the same for all:
resuming from the stage's last checkpoint, metrics and progress (``MetricWriter``), a checkpoint
every ``checkpoint_every`` steps and at the end, the non-finite policy and preemption.

Preemption: inside :func:`guard` the first SIGTERM or SIGINT only sets a flag; the loop finishes
the step it is in, saves a checkpoint of that step (waiting for the write), and raises
:class:`Preempted`. So the time from the signal to the exit is bounded by one step plus one
checkpoint write, and a checkpoint is never cut in half by the signal. A second SIGINT (Ctrl-C
twice) stops at once: one line, exit 130, the process gone without unwinding (a checkpoint
being written is left unfinished, and the next run removes it and resumes from the last
complete one; before, the unwinding cut Orbax's write under its threads, which printed dozens
of tracebacks). Outside a guarded loop (data preparation, evaluation, export) the signals
raise ``KeyboardInterrupt`` immediately: nothing there needs saving. With several processes the
flag is agreed every step (:func:`stop_requested` is a small all-gather), so all processes stop
after the same step and save it together.

Non-finite steps: the jitted step leaves no trace of a step whose loss or gradient is not
finite (``emit_jax.training.optim.update_if_finite``); on the host (:class:`NonFiniteCounter`)
the policy is ``skip`` (count the step and go on; stop after :data:`MAX_CONSECUTIVE` bad steps
in a row, which means the run is diverging rather than hitting one bad batch) or ``stop`` (stop
at the first one, after saving the last good state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

from emit_jax.errors import (STOP_SIGNALS, NonFiniteError, exit_interrupted, program,
                             stop_signals_held)
from emit_jax.training.metrics import MetricWriter, read_metrics
from emit_jax.training.state import StageCheckpoints

POLICIES = ("skip", "stop")
MAX_CONSECUTIVE = 5


# ------------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class StepResult:
    """What one step reports: whether it was finite (applied), its scalars (host floats) and
    the tokens it processed (for the throughput figure)."""
    finite: bool
    scalars: dict[str, float]
    tokens: int = 0


@dataclasses.dataclass
class Stage:
    """A stage as the loop sees it.

    - ``step(n, batch) -> StepResult``: one optimiser step on ``batch`` (updating ``model`` /
      ``optimizer`` in place);
    - ``summarize(results, skipped) -> dict``: a log line's metrics from the
      :class:`StepResult` of the steps since the last line (``skipped``: non-finite steps so
      far); ``log_every`` steps a line (and at the last step);
    - ``data``: an iterator of batches with ``get_state()`` / ``set_state(state)``;
      ``data_state(meta)``: the iterator state to continue from, read from a checkpoint's meta;
    - ``extra_meta() -> dict`` / ``restore_meta(meta)``: stage-specific checkpoint metadata.
    """
    name: str
    steps: int
    model: Any
    optimizer: Any
    data: Iterator
    step: Callable[[int, Any], StepResult]
    summarize: Callable[[Sequence[StepResult], int], dict]
    log_every: int = 1
    show: tuple[str, ...] | None = None
    data_state: Callable[[dict], Any] = lambda meta: meta["data"]
    extra_meta: Callable[[], dict] = dict
    restore_meta: Callable[[dict], None] = lambda meta: None


def run_loop(stage: Stage, ckpt: StageCheckpoints, stage_dir: str, *,
             on_nonfinite: str = "skip") -> list[dict]:
    """Run ``stage`` from its last checkpoint in ``ckpt`` to ``stage.steps``; returns the
    history of logged metrics (``[{"step": n, **metrics}, ...]``). On SIGTERM / SIGINT, or
    when the non-finite policy stops the run, the last finished (good) step is saved first."""
    start = 0
    meta = ckpt.restore(stage.model, stage.optimizer)
    if meta is not None:
        start = int(meta["step"])
        stage.data.set_state(stage.data_state(meta))
        stage.restore_meta(meta)
        if start > stage.steps:  # a rerun asking for fewer steps than were trained
            print(f"warning: {stage.name} resumes from its checkpoint at step {start}, past "
                  f"{stage.name}.steps={stage.steps}: no step runs, and the stage is finished "
                  f"with the {start} steps it has (a new --workdir trains {stage.steps})",
                  file=sys.stderr, flush=True)
        elif start > 0:  # (twenty-second probe W2b: not said, the stage seemed to train anew)
            print(f"[{stage.name}] resumes from its checkpoint at step {start} of {stage.steps}"
                  + (": no step is left to run, its model is saved from that checkpoint"
                     if start == stage.steps else ""), file=sys.stderr, flush=True)
    progress = MetricWriter(stage_dir, stage=stage.name, total_steps=stage.steps, start_step=start)
    counter = NonFiniteCounter(stage.name, on_nonfinite,
                               skipped=(meta or {}).get("nonfinite_skipped", 0))
    history: list[dict] = []
    since: list[StepResult] = []
    tokens = 0
    done, data_state = start, stage.data.get_state()

    def meta_at(step):
        return {"step": step, "data": data_state, "nonfinite_skipped": counter.skipped,
                **stage.extra_meta()}
    try:
        with guard():
            for step in range(start + 1, stage.steps + 1):
                result = stage.step(step, next(stage.data))
                counter.record(step, result.finite)  # raises when the policy says stop
                since.append(result)
                tokens += result.tokens
                if step % stage.log_every == 0 or step == stage.steps:
                    metrics = stage.summarize(since, counter.skipped)
                    progress.write(step, metrics, tokens=int(tokens), show=stage.show)
                    history.append({"step": step, **metrics})
                    since, tokens = [], 0
                done, data_state = step, stage.data.get_state()
                ckpt.save(step, stage.model, stage.optimizer, meta_at(step),
                          force=step == stage.steps)
                if stop_requested():
                    raise Preempted(f"{stage.name}: stopped after step {step}")
    except (KeyboardInterrupt, NonFiniteError):  # a signal, or the non-finite policy: save the
        progress.close()                          # last finished (good) step, then stop
        with signals_stop_at_once():  # (a second Ctrl-C while the save was awaited, outside the
            # loop's guard, raised inside Orbax's wait: tracebacks of its threads, then the line)
            ckpt.save_interrupted(done, start, stage.model, stage.optimizer, meta_at(done))
        raise
    with signals_after_the_write():  # the last step's checkpoint is still being written
        ckpt.close()
    progress.close()
    if start > 0 and progress.enabled:
        # the whole stage's history, the runs before this one's included (before: a resumed
        # stage's done.json and results.json held only the last run's steps, none when it
        # resumed at its last step)
        try:
            history = [{"step": r["step"], **{k: v for k, v in r.items()
                                              if k not in ("stage", "step", "time")}}
                       for r in read_metrics(progress.path)
                       if isinstance(r.get("step"), int) and r["step"] <= max(start, stage.steps)]
        except (OSError, ValueError):
            pass
    return history


# ------------------------------------------------------------------------------ non-finite steps
class NonFiniteCounter:
    """Host-side bookkeeping of skipped steps for one stage."""

    def __init__(self, stage: str, policy: str = "skip", skipped: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"nonfinite must be one of {POLICIES}, got {policy!r}")
        self.stage, self.policy = stage, policy
        self.skipped, self.consecutive = int(skipped), 0

    def record(self, step: int, ok: bool) -> bool:
        """Count step ``step``; returns ``ok``. Raises :class:`NonFiniteError` when the policy
        says stop (the caller has not saved anything of this step: its state is unchanged)."""
        if ok:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.policy == "stop":
            raise NonFiniteError(f"{self.stage}: non-finite loss or gradient at step {step} "
                                 f"(nonfinite='stop'); the last good state is saved")
        if self.consecutive >= MAX_CONSECUTIVE:
            raise NonFiniteError(f"{self.stage}: {self.consecutive} steps in a row with a "
                                 f"non-finite loss or gradient (last: step {step}); stopping, the "
                                 f"last good state is saved")
        print(f"warning: {self.stage}: step {step} skipped, non-finite loss or gradient "
              f"({self.skipped} skipped so far)", file=sys.stderr, flush=True)
        return False


# ------------------------------------------------------------------------------ preemption
class Preempted(KeyboardInterrupt):
    """A guarded loop stopped on a signal after saving its last finished step."""


_flag = threading.Event()


def _on_signal(signum, frame):
    if signum == signal.SIGINT and _flag.is_set():
        stop_at_once()
    _flag.set()


def stop_at_once() -> None:
    """The second Ctrl-C: say so and end the process now (``os._exit(130)``)."""
    exit_interrupted(f"{program()}: interrupted (second SIGINT): stopped at once, without "
                     "finishing the step or checkpoint in progress; rerun the same command to "
                     "resume from the last complete checkpoint")


def _at_once(signum, frame):
    if signum == signal.SIGINT:
        stop_at_once()
    exit_interrupted(f"{program()}: interrupted ({signal.Signals(signum).name} while the "
                     "stopping step's checkpoint was written): stopped at once; rerun the "
                     "same command to resume from the last complete checkpoint")


@contextlib.contextmanager
def _stop_signals_to(handler):
    """While the block runs, every stopping signal the process does not ignore goes to
    ``handler`` (main thread only; elsewhere a no-op); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS
           if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def signals_stop_at_once():
    """While the stopping stage's last checkpoint is written: a further SIGINT / SIGTERM ends
    the process at once in one line (:func:`stop_at_once`; the checkpoint before it is
    complete). Main thread only; elsewhere a no-op."""
    return _stop_signals_to(_at_once)


@contextlib.contextmanager
def signals_after_the_write():
    """While a finished stage's last checkpoint is awaited (after the loop's guard): a SIGINT /
    SIGTERM waits for the write to complete and is then raised as ``KeyboardInterrupt`` (the
    stage is saved; a rerun finds it complete); a second one ends the process at once
    (:func:`signals_stop_at_once`'s line). Before, it was raised inside Orbax's wait: three
    tracebacks of its threads, and the step's checkpoint left unfinished (twenty-sixth probe
    ST8 / MB6). Main thread only; elsewhere a no-op.

    With several processes the write waits for every process, and one that died (``kill -9``)
    never comes: the wait is given ``PEER_WAIT`` seconds after the signal, then the process
    stops at once (twenty-seventh probe MK2/MK3: it waited for the coordination service's
    heartbeat timeout, deaf to the launcher's SIGTERM, and aborted with jax's fatal error)."""
    with stop_signals_held(lambda signum: _at_once(signum, None),
                           several=not _single_process()) as got:
        yield
    if got:
        raise KeyboardInterrupt(f"{signal.Signals(got[0]).name} as the stage's last checkpoint "
                                "was written; it is complete")


@contextlib.contextmanager
def guard():
    """While active, SIGTERM / SIGINT request a stop at the next step boundary (main thread
    only; elsewhere a no-op). A signal set to be ignored when the guard starts (SIGINT in a
    job started in the background) is left ignored; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # (a request left pending by the last loop's end is kept: see below)
    # a signal the process was started to ignore (SIGINT of a background job, nohup) stays ignored
    old = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS
           if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
        # a signal after the loop's last check, agreed by every process (they all end the loop
        # here): before, one process stopped and the others went on into the next stage's
        # collectives and waited there for ever (twentieth probe C54)
        late = stop_requested()
    except BaseException:
        _flag.clear()
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if late or (_flag.is_set() and _single_process()):  # the stage is saved; stop now
        _flag.clear()
        raise KeyboardInterrupt("signal during the last step")
    # several processes, a signal after the agreement: kept for the next guarded loop, whose
    # first step agrees on it (guard() keeps a pending request; every other exit clears it)


def _single_process() -> bool:
    import jax  # noqa: PLC0415

    return jax.process_count() == 1


def stop_requested() -> bool:
    """Whether a stop was requested on any process (a collective with several processes: call
    it at the same point of every step on every process)."""
    # only here: the loop module stays importable without a backend
    from emit_jax.parallel.distributed import any_process  # noqa: PLC0415

    return any_process(_flag.is_set())


def request_stop() -> None:
    """Ask the guarded loop to stop after its current step (what the signal handler does)."""
    _flag.set()
