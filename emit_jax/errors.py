"""Every error a user can cause, in one place, and the one line each becomes.

The command-line entry points catch :data:`USER_ERRORS` and print ``prog: error: <message>``
with a non-zero exit (``emit_jax.cli.run``); library code raises the class that names what was
wrong. This module imports nothing else of the project: every layer may raise these.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Callable, Iterator, NoReturn


class ConfigError(ValueError):
    """A config that cannot be used: a config.json that does not describe a supported InternVL
    model, or a training config with a bad value."""


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used; the message names the file."""


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


class TokenizerError(ValueError):
    """A tokenizer folder or tokenizer that EMIT cannot use; the message is one line."""


class MMADError(ValueError):
    """Malformed MMAD data; the one-line message names the file, the record key and the question."""


class PlanError(ValueError):
    """Bad input to the memory plan: unknown device, unparsable mesh, missing config file..."""


class AotError(ValueError):
    """Bad input to the compile check: no libtpu, unknown topology, a mesh that does not fit the
    slice..."""


class NonFiniteError(FloatingPointError):
    """Training stopped on non-finite numbers; the last good state is saved."""


#: what a command line reports as one ``error:`` line (exit 2) instead of a traceback
class InputOverwriteError(ValueError):
    """An output path that is, or lies inside, one of the command's inputs."""


class LockedError(ValueError):
    """A folder another process is writing (it holds the folder's lock): a second trainer on
    one workdir. The message names the folder and the holder."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, CheckpointError, DataError, ImageError, TokenizerError, MMADError, PlanError,
    AotError, InputOverwriteError, LockedError, OSError)


def has_control(name: str) -> bool:
    """Whether ``name`` holds a newline, tab or other control character."""
    return any(ord(c) < 32 or ord(c) == 127 for c in name)


#: the exit status of a command stopped by SIGINT / SIGTERM (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130


def exit_interrupted(line: str) -> NoReturn:
    """Flush stdout, print ``line`` on stderr and end the process at once with
    :data:`INTERRUPTED` (``os._exit``: no unwinding, no waiting for library threads)."""
    import contextlib
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        os.write(2, (line + "\n").encode("utf-8", "replace"))
    os._exit(INTERRUPTED)


def program() -> str:
    """The module ``python -m`` runs (``emit_jax.train``), from the interpreter's command
    line; ``emit_jax`` when that cannot be told: the name a message starts with where the
    command's own name is not at hand."""
    import sys

    argv = list(getattr(sys, "orig_argv", []))
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else "emit_jax"


def not_utf8(raw: bytes, fix: str) -> str:
    """The words for a name Python could not decode (``raw``: its bytes): ``is not valid UTF-8
    (<fix>)``; or, where the bytes are UTF-8 but Python reads file names in another encoding
    (``PYTHONUTF8=0`` with a C or Latin-1 locale), that this is the cause and how to run
    instead (before: "not valid UTF-8 (rename it)" of a valid name such as ``écrou``)."""
    import codecs
    import sys

    encoding = sys.getfilesystemencoding()
    if codecs.lookup(encoding).name != "utf-8":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return (f"cannot be read here: it is UTF-8, and Python reads file names as "
                    f"{encoding} in this environment (PYTHONUTF8=0, or the locale); run with "
                    "PYTHONUTF8=1 or a UTF-8 locale")
    return f"is not valid UTF-8 ({fix})"


def show_path(path) -> str:
    """``path`` as a message names it: as is, or quoted (Python's ``repr``) when a reader could
    not see it exactly: white space at either end or doubled (a one-line message collapses it),
    a newline or another control character; a name that is not valid UTF-8 (Python hands its
    bytes over as lone surrogates, which no terminal, figure or file can show) as its bytes,
    ``b'q\\xff.png'`` (thirtieth probe: ``q\\udcff.png``, Python's escape)."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    if any("\udc80" <= c <= "\udcff" for c in text):
        return repr(os.fsencode(text))
    if text != text.strip() or "  " in text or has_control(text):
        return repr(text)
    return text


def message(e: BaseException) -> str:
    """The one-line text of a user error (an ``OSError`` as ``<file>: <strerror>``)."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{show_path(e.filename)}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


#: the signals that stop a command cleanly (one line, exit 130, nothing half-written, a
#: training's step saved): Ctrl-C, ``kill``, SIGHUP, which a closed terminal or a dropped ssh
#: session sends, and SIGUSR1, SLURM's warning before it pre-empts a job (``--signal=USR1@T``).
#: Before, the last two killed the process at once, the step in progress lost.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)

#: seconds a process of a multi-process run, signalled while a write that every process takes
#: part in is awaited, waits for it before it stops at once (a process that died never comes)
PEER_WAIT = 10.0


@contextlib.contextmanager
def stop_signals_held(at_once: Callable[[int], object], *, several: bool) -> Iterator[list]:
    """While the block runs, a stopping signal the process does not ignore is held: the list
    yielded gets its number, for the caller to act on once the block is over; a second one
    calls ``at_once(signum)`` (which ends the process). With ``several`` processes the awaited
    write may wait for one that is gone: ``PEER_WAIT`` seconds after the first signal, it
    counts as the second. Main thread only; elsewhere a no-op (nothing is held)."""
    import threading

    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    timers: list[threading.Timer] = []

    def later(signum, frame):
        if got:
            at_once(signum)
        got.append(signum)
        if several:
            timers.append(threading.Timer(PEER_WAIT, os.kill, (os.getpid(), signum)))
            timers[-1].daemon = True
            timers[-1].start()

    old = {s: signal.signal(s, later) for s in STOP_SIGNALS
           if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield got
    finally:
        for t in timers:
            t.cancel()
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def interrupted(e: BaseException | None) -> bool:
    """Whether ``e`` is a ``KeyboardInterrupt`` or was raised from or while handling one: Ctrl-C
    or SIGTERM delivered while a library ran Python code for it (TensorStore's callbacks during
    an Orbax restore) comes back wrapped in that library's own ``Exception``, which must not be
    taken for a damaged file."""
    return any(isinstance(x, KeyboardInterrupt) for x in causes(e))


def causes(e: BaseException | None):
    """``e`` and the exceptions it was raised from or while handling, each once, nearest
    first."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__
