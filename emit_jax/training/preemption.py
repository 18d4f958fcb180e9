"""Stopping a training loop cleanly on SIGTERM / SIGINT (preemption, ``scancel``, Ctrl-C).

Inside :func:`guard` the first SIGTERM or SIGINT only sets a flag; the loop finishes the step it
is in, saves a checkpoint of that step (waiting for the write), and raises :class:`Preempted`.
So the time from the signal to the exit is bounded by one step plus one checkpoint write, and a
checkpoint is never cut in half by the signal. A second SIGINT (Ctrl-C twice) stops at once.
Outside a guarded loop (data preparation, evaluation, export) the signals raise
``KeyboardInterrupt`` immediately, as before: nothing there needs saving.

With several processes the flag is agreed every step (:func:`stop_requested` is a small
all-gather), so all processes stop after the same step and save it together even when the
scheduler signals them at slightly different times.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import numpy as np


class Preempted(KeyboardInterrupt):
    """A guarded loop stopped on a signal after saving its last finished step."""


_flag = threading.Event()


def _on_signal(signum, frame):
    if signum == signal.SIGINT and _flag.is_set():
        raise KeyboardInterrupt("second SIGINT")
    _flag.set()


@contextlib.contextmanager
def guard():
    """While active, SIGTERM / SIGINT request a stop at the next step boundary (main thread
    only; elsewhere a no-op). A signal set to be ignored when the guard starts (SIGINT in a
    job started in the background) is left ignored; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _flag.clear()
    # a signal the process was started to ignore (SIGINT of a background job, nohup) stays ignored
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)
           if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    except BaseException:
        _flag.clear()
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if _flag.is_set():  # a signal after the loop's last check: the stage is saved; stop now
        _flag.clear()
        raise KeyboardInterrupt("signal during the last step")


def stop_requested() -> bool:
    """Whether a stop was requested on any process (a collective with several processes: call
    it at the same point of every step on every process)."""
    local = _flag.is_set()
    import jax

    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(local))).any())


def request_stop() -> None:
    """Ask the guarded loop to stop after its current step (what the signal handler does)."""
    _flag.set()
