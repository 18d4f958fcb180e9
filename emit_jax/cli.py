"""Shared command-line plumbing: bad input becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import atexit
import _thread
import contextlib
import errno
import functools
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from typing import Callable, NoReturn

from emit_jax.errors import (INTERRUPTED, STOP_SIGNALS, USER_ERRORS, ConfigError,  # noqa: F401
                             exit_interrupted, message, program)  # (re-exported)
from emit_jax.fileio import user_path
from emit_jax.limits import (INT_MAX, MAX_DEVICES, MAX_IMAGE_SIDE, MAX_MATRIX_SIDE,  # noqa: F401
                             MAX_REPEATS, MAX_TILES, MAX_TOKENS)  # (re-exported)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors (an unknown flag, a missing or malformed value)
    raise ``error_type(message)`` instead of printing the usage and exiting: the command's
    ``main`` reports them as it reports any other bad input, in one line (:func:`fail`), exit 2."""

    def __init__(self, *args, error_type: type[Exception] = ConfigError, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_type = error_type
        self._given: set[str] = set()
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def error(self, message):  # one line, exit 2 (by the caller)
        raise self.error_type(message)

    def parse_known_args(self, args=None, namespace=None):
        self._given = set()  # the options seen in this parse (_StoreOnce)
        known, rest = super().parse_known_args(args, namespace)
        for name, value in vars(known).items():  # quoted '~/x', LINK/../x: as the user meant
            if isinstance(value, str):
                try:
                    setattr(known, name, user_path(value))
                except ConfigError as e:
                    self.error(f"--{name.replace('_', '-')}: {e}")
        return known, rest

    def add_subparsers(self, **kwargs):
        """Sub-commands' parsers report their usage errors the same way (one line)."""
        kwargs.setdefault("parser_class", functools.partial(type(self), error_type=self.error_type))
        return super().add_subparsers(**kwargs)


class _StoreOnce(argparse._StoreAction):
    """argparse's ``store``, except that an option given twice with different values
    (``--stage 1 ... --stage 2``, ``--out a --out b``) is a usage error naming both instead of
    the last one silently winning. The same value twice is accepted."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "_given", None)
        if option_string is not None and given is not None:
            if self.dest in given and getattr(namespace, self.dest, None) != values:
                def show(v):
                    return " ".join(map(str, v)) if isinstance(v, list) else str(v)
                parser.error(f"argument {'/'.join(self.option_strings)}: given twice "
                             f"({show(getattr(namespace, self.dest))!r}, then {show(values)!r}); "
                             "give it once")
            given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


# ----------------------------------------------------------------- numeric flags (argparse type=)
# Each checks the value when the command line is read, so a flag out of range is one line that
# names it (argparse adds "argument --flag: "), before anything is loaded or written.
def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value




def int_at_least(low: int, high: int = INT_MAX) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in ``[low, high]``."""
    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"  # argparse names the type in some messages
    return parse


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in ``[low, high]``."""
    return int_at_least(low, high)



def nonempty(text: str) -> str:
    """An argparse ``type``: any text but the empty string (an empty ``--split`` silently meant
    the default)."""
    if not text:
        raise argparse.ArgumentTypeError("empty; give a value or leave the flag out")
    return text


def output_folder(text: str) -> str:
    """An argparse ``type`` for a new output folder: not the empty string (an unset shell
    variable: ``export --out ""`` wrote the model into the current folder; twenty-seventh
    probe N6)."""
    if not text:
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?); name the new "
                                         "folder to write")
    return text


#: a whole number >= 1 (counts, sizes, lengths, repeats)
positive_int = int_at_least(1)
#: a whole number >= 0 (seeds, optional counts where 0 means none / off)
nonneg_int = int_at_least(0)


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[low, high]`` (``low_open`` / ``high_open``:
    the bound excluded; ``None``: unbounded)."""
    def parse(text: str) -> float:
        value = _number(text, float, "a number")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, "
                                             f"got {text}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g}, "
                                             f"got {text}")
        return value
    parse.__name__ = "number"
    return parse


#: a finite number > 0
positive_float = float_in(0.0, low_open=True)
#: a finite number >= 0
nonneg_float = float_in(0.0)
#: a finite number in [0, 1]
unit_float = float_in(0.0, 1.0)
#: a percentage in [0, 100) (memory headroom)
percent = float_in(0.0, 100.0, high_open=True)


#: what to make smaller when a command runs out of memory, for the commands whose settings
#: are flags (the default names the training config's)
OOM_HINTS = {
    "emit_jax.demo": "a smaller --arch or fewer --new-tokens",
    "emit_jax.evaluate": "a smaller --max-tiles or --max-new-tokens, or a smaller model",
    "emit_jax.visualize": "smaller images or a smaller model",
    "python -m bench": "a smaller --batch, --grid, --prompt-len or --new-tokens, or a smaller "
                       "--arch",
}
_TRAINING_HINT = ("a smaller batch, prompts_per_step, G, max_tiles or length; python -m "
                  "emit_jax.plan estimates a config's memory")


def out_of_memory(e: BaseException, prog: str | None = None) -> str | None:
    """The one-line message for an allocation that failed (host memory: ``MemoryError``, as
    NumPy raises for an array too large; a device: XLA's ``RESOURCE_EXHAUSTED``), or None for
    any other error. Settings that ask for too much (a batch, a length, a tile count) end this
    way: a user error, not a crash."""
    text = " ".join(str(e).split())
    if isinstance(e, MemoryError):
        where = "host memory"
    elif "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
        where = "device memory"
    else:
        return None
    if len(text) > 300:
        text = text[:297] + "..."
    return (f"out of {where}: {text or type(e).__name__}; the settings ask for more than this "
            f"machine has ({OOM_HINTS.get(prog or '', _TRAINING_HINT)})")


def backend_error(e: BaseException) -> str | None:
    """The one-line message when ``e`` is JAX failing to start the platform ``JAX_PLATFORMS``
    names (an unknown name: a ``RuntimeError``; a GPU platform without its plugin: an
    ``AssertionError`` inside ``xla_bridge``), or None for any other error."""
    named = os.environ.get("JAX_PLATFORMS", "")
    tb, in_bridge = e.__traceback__, False
    while tb is not None:
        in_bridge |= tb.tb_frame.f_code.co_filename.endswith("xla_bridge.py")
        tb = tb.tb_next
    text = " ".join(str(e).split())
    if not (in_bridge or "Unable to initialize backend" in text):
        return None
    why = f" ({text[:200]})" if text else ""
    xla = os.environ.get("XLA_FLAGS", "").strip()
    if xla:  # read as the platform starts: a bad value fails it (a device count of 0...)
        return (f"JAX cannot start {f'the platform JAX_PLATFORMS={named} names' if named else 'a platform'}"
                f" on this host{why}; check XLA_FLAGS={xla}, which it reads as it starts")
    if named:
        return (f"JAX_PLATFORMS={named}: JAX cannot start that platform on this host{why}; "
                "unset JAX_PLATFORMS or name one this host has (e.g. cpu)")
    return f"JAX cannot start a platform on this host{why}"


def jax_flag_error(e: BaseException) -> str | None:
    """The one-line message when ``e`` is JAX refusing the value of one of its flags, read from
    the environment when jax is imported (``JAX_DEFAULT_MATMUL_PRECISION=bogus``: a
    ``ValueError`` traceback before), or None for any other error."""
    text = " ".join(str(e).split())
    found = (re.fullmatch(r'Invalid value "(.*)" for JAX flag (\w+)', text)
             or re.fullmatch(r"invalid truth value '(.*)' for environment '(\w+)'", text)) \
        if isinstance(e, ValueError) else None
    if found is None:
        return None
    env = found.group(2).upper()
    where = f"{env}={found.group(1)}" if os.environ.get(env) == found.group(1) else \
        f"JAX flag {found.group(2)}={found.group(1)}"
    return f"{where}: JAX does not know that value; unset it or give one JAX accepts"


def check_jax_environment(prog: str | None = None) -> None:
    """Under ``python -m emit_jax.<command>``, when a ``JAX_*`` variable is set: import jax
    now, so that a value JAX refuses as it reads its flags at import
    (``JAX_DEFAULT_MATMUL_PRECISION=bogus``, ``JAX_ENABLE_X64=abc``) ends the command with one
    line, exit 2. Before, the commands that import jax at the top of their module (train, plan,
    aot...) printed the import's traceback. An ``XLA_FLAGS`` that XLA would read as a file name
    (its first word not a ``--flag``) that is no file is one line too (before: XLA's fatal log
    line, exit 1); an unknown ``--xla_...`` flag is left to XLA (one fatal line). An
    ``OMP_NUM_THREADS`` that is no thread count (``0``, ``abc``) gets one ``warning:`` line and
    is unset for the run (before: libgomp's own line, "Invalid value for environment variable
    OMP_NUM_THREADS", as a library loaded it)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp is not None and not re.fullmatch(r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*", omp):
        print(f"warning: OMP_NUM_THREADS={omp!r}: not a thread count (a positive whole number, "
              "or several comma-separated); left unset for this run", file=sys.stderr)
        del os.environ["OMP_NUM_THREADS"]
    value = os.environ.get("XLA_FLAGS")
    flags = (value or "").split() or ([value] if value else [])  # blank: read as a file name
    if flags and not flags[0].startswith("-") and not os.path.isfile(flags[0]):
        # XLA reads such a value as a file of flags and aborts with its own fatal line
        prog = prog or program()
        print(f"{prog}: error: XLA_FLAGS={os.environ['XLA_FLAGS']}: XLA reads a value that does "
              f"not start with -- as the name of a file of flags, and "
              f"{flags[0] if flags[0].strip() else repr(flags[0])} is no file; "
              "give flags as --name=value", file=sys.stderr)
        raise SystemExit(2)
    if "jax" in sys.modules or not any(k.startswith("JAX_") for k in os.environ):
        return
    try:
        import jax  # noqa: F401
    except ValueError as e:
        line = jax_flag_error(e)
        if line is None:
            raise
        prog = prog or program()
        print(f"{prog}: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def runtime_error(e: BaseException, prog: str | None = None) -> str | None:
    """The one-line message of an error the machine or its environment caused rather than the
    code (:func:`out_of_memory`, :func:`backend_error`, :func:`jax_flag_error`), or None."""
    return out_of_memory(e, prog) or backend_error(e) or jax_flag_error(e) or peer_lost(e)


#: how a collective or the coordination service reports a process of the run that is gone
_PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|"
                        r"Gloo \w+ failed|coordination service|heartbeat|Socket closed|"
                        r"Barrier failed|waiting for \S+ barrier", re.IGNORECASE)


def peer_lost(e: BaseException) -> str | None:
    """The one-line message when, in a multi-process run, ``e`` is a collective failing because
    another process of the run ended (stopped by a signal or an error of its own, or killed):
    a ``JaxRuntimeError`` traceback from deep inside a collective before. None otherwise."""
    dist = sys.modules.get("emit_jax.parallel.distributed")
    text = " ".join(str(e).split())
    if dist is None or not dist.started() or not _PEER_LOST.search(text):
        return None
    dist.note_peer_lost()  # its end: at once (parallel.distributed.leave)
    return (f"another process of this multi-process run ended or cannot be reached ({text[:200]}); "
            "its log says why; rerun the same command on every process to resume from the last "
            "checkpoint")


def no_x64(prog: str) -> None:
    """``JAX_ENABLE_X64`` set (a shell profile kept for other work): one ``warning:`` line and
    64-bit mode off. emit_jax computes in 32 bits, and under 64-bit defaults its index
    arithmetic mixes int64 with int32 (a ``TypeError`` traceback in the sampler before)."""
    value = os.environ.get("JAX_ENABLE_X64", "")
    if value.strip().lower() not in ("1", "y", "yes", "t", "true", "on"):
        return
    print(f"{prog}: warning: JAX_ENABLE_X64={value}: ignored; emit_jax runs in 32-bit mode",
          file=sys.stderr)
    os.environ["JAX_ENABLE_X64"] = "0"
    if "jax" in sys.modules:  # imported already (a test, a notebook): its flag too
        sys.modules["jax"].config.update("jax_enable_x64", False)


def fail(prog: str, e: BaseException) -> int:
    """Print ``prog: error: <message>`` (one line) on stderr; the exit status of bad input, 2."""
    print(f"{prog}: error: {message(e)}", file=sys.stderr)
    return 2


#: what an interrupted command that writes its outputs atomically leaves behind
NOTHING_LEFT = "nothing half-written is left"


def interrupted_line(prog: str, when: str, left: str = NOTHING_LEFT) -> str:
    """The one line every command prints when a signal stops it: ``<prog>: interrupted <when>;
    <left>``, ``when`` the signal (``(SIGINT)``) or how far the command got (``after 3 of 10
    questions``), ``left`` what it leaves behind."""
    return f"{prog}: interrupted {when}; {left}"


def _importing(frame) -> bool:
    """Whether ``frame`` (where a signal's handler runs) is inside an import: importlib's frames
    are on its stack."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


# ------------------------------------------------------------------- while a command's modules load
_EARLY: dict = {}  # interrupt_early's command name and the handlers it replaced


def interrupt_early(prog: str | None = None) -> None:
    """From now on (main thread), a SIGINT or SIGTERM that arrives while a module is being
    imported prints ``<prog>: interrupted (<signal>); nothing half-written is left`` and ends the
    process at once with exit status 130 (:func:`exit_interrupted`): nothing is written yet.
    Elsewhere the signals do what they did before (:func:`run` installs its own for ``main``).

    Called before a command's modules load: by ``emit_jax/__init__.py`` for ``python -m
    emit_jax.<command>`` (``prog`` the module's name), by ``bench/__main__.py``. The Ctrl-C of
    a user who changed their mind in the first seconds lands in ``import jax``, where Python's
    own ``KeyboardInterrupt`` was swallowed by jax's gc callback (the command then ran on and
    exited 0), became an ``ImportError``, or crashed an extension's initialisation (a
    segfault)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if prog is None:
        argv = list(getattr(sys, "orig_argv", ()))
        prog = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else "emit_jax"
    _EARLY["prog"] = prog
    for s in STOP_SIGNALS:
        old = signal.getsignal(s)
        if old is not signal.SIG_IGN and old is not _early_signal:  # ignored stays ignored
            _EARLY[s] = old
            signal.signal(s, _early_signal)


def _early_signal(signum, frame):
    if _importing(frame):
        exit_interrupted(interrupted_line(_EARLY["prog"], f"({signal.Signals(signum).name})"))
    old = _EARLY.get(signum)
    if callable(old):  # SIGINT: Python's KeyboardInterrupt
        return old(signum, frame)
    signal.signal(signum, old if old is not None else signal.SIG_DFL)  # SIGTERM: the default
    signal.raise_signal(signum)


# ------------------------------------------------------------------------------ while main runs
#: set when an interrupted command's process is ending: nothing more is reported
_STOPPING = threading.Event()
#: set while a command runs as its process's own (:func:`command`), not called in-process
_COMMAND = threading.Event()
#: after a swallowed KeyboardInterrupt, or a signal that arrived inside an import: the signal
#: is handled again this many seconds later
AGAIN_AFTER = 0.02


class _Block:
    """The state of one :func:`interrupts` block."""

    def __init__(self):
        self.received: list[str] = []  # the signals handled, by name
        self.active = True
        self.lock = threading.Lock()

    def again(self, signum: int) -> None:
        """Handle ``signum`` again :data:`AGAIN_AFTER` seconds from now, if the block still
        runs (``interrupt_main`` only calls the Python handler: no signal is sent)."""
        def later():
            time.sleep(AGAIN_AFTER)
            with self.lock:
                if self.active:
                    _thread.interrupt_main(signum)
        threading.Thread(target=later, daemon=True, name="emit-interrupt-again").start()


@contextlib.contextmanager
def interrupts():
    """While the block runs, SIGINT and SIGTERM raise ``KeyboardInterrupt(<signal name>)``, so
    SIGTERM unwinds like Ctrl-C: files and folders being written atomically are removed instead of
    left behind as ``.tmp-*`` (main thread only; a signal the process was started to ignore
    stays ignored). Yields the list of the signals received, by name: a caller can tell an
    interrupt that did not reach it from none.

    - Inside an import the exception is not raised (there it can become an ``ImportError`` or
      crash a C extension's initialisation): the signal is handled again 20 ms later, until
      it lands outside one.
    - Raised inside a gc callback or a ``__del__`` (jax's ``_xla_gc_callback`` runs at every
      collection), Python drops it as unraisable ("Exception ignored in ..."): it is handled
      again likewise, and that report is not printed.
    - Once a signal has arrived, what library threads report as unraisable or uncaught while the
      block unwinds, and warnings, are not printed: Orbax's asyncio loops, closed under
      TensorStore's callbacks by a SIGTERM during a checkpoint read, raise one ``RuntimeError:
      Event loop is closed`` per array, and its coroutines are "never awaited"."""
    block = _Block()
    if threading.current_thread() is not threading.main_thread():
        yield block.received
        return

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        block.received.append(name)
        if not block.active:  # the block is ending: its caller looks at ``received``
            return
        if _importing(frame):
            block.again(signum)
            return
        raise KeyboardInterrupt(name)

    unraisable, excepthook, showwarning = (sys.unraisablehook, threading.excepthook,
                                           warnings.showwarning)

    def quiet_unraisable(u):
        if block.active and isinstance(u.exc_value, KeyboardInterrupt):
            name = str(u.exc_value)
            block.again(signal.Signals[name] if name in signal.Signals.__members__
                        else signal.SIGINT)
            return
        if not (_STOPPING.is_set() or block.received):
            unraisable(u)

    def quiet_excepthook(args):
        if not (_STOPPING.is_set() or block.received):
            excepthook(args)

    def quiet_warning(*args, **kwargs):
        if not (_STOPPING.is_set() or block.received):
            showwarning(*args, **kwargs)

    old = {}
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            old[s] = signal.signal(s, on_signal)
    sys.unraisablehook, threading.excepthook = quiet_unraisable, quiet_excepthook
    warnings.showwarning = quiet_warning
    try:
        yield block.received
    finally:
        with block.lock:
            block.active = False
        for s, h in old.items():  # (a finishing handler set in the block stays: the work is over)
            if not getattr(signal.getsignal(s), "finishing", False):
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        if sys.unraisablehook is quiet_unraisable:
            sys.unraisablehook = unraisable
        if threading.excepthook is quiet_excepthook:
            threading.excepthook = excepthook
        if warnings.showwarning is quiet_warning:
            warnings.showwarning = showwarning


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
        prog: str = "emit_jax") -> int:
    """Call ``main(argv)``; a user error (bad config or checkpoint, a path that is missing,
    exists already, is unwritable, a full disk) prints ``prog: error: <message>`` and returns 2.
    Ctrl-C (SIGINT) or SIGTERM prints ``prog: interrupted (<signal>); nothing half-written is
    left`` and returns 130: outputs are written under temporary names and renamed when
    complete, and those are removed as the interrupt unwinds (:func:`interrupts`). So does a
    signal whose ``KeyboardInterrupt`` a library turned into its own error, or that ``main``
    finished without."""
    return _run(main, argv, prog)


def command(main: Callable[[list[str] | None], int | None], prog: str) -> NoReturn:
    """A command's ``__main__`` block: ``sys.exit(run(main, prog=prog))``, except that an
    interrupted command ends with ``os._exit(130)`` as soon as its line is printed (its
    outputs removed already, as the interrupt unwound): nothing library threads still shutting
    down report comes after the line (Orbax's "Event loop is closed"), and the exit does not
    wait for them."""
    _COMMAND.set()
    status = _run(main, None, prog, final=True)
    finishing(prog, status)
    end(status)


def may_exit(status: int) -> bool:
    """False when this process, one of a multi-process run, must end ``status`` at once rather
    than through Python's exit, whose ``jax.distributed`` shutdown would wait for processes
    that wait for it (``parallel.distributed.leave``). True in a single-process command."""
    dist = sys.modules.get("emit_jax.parallel.distributed")  # loaded by a multi-process run
    return dist is None or dist.leave(status)


def flush_and_exit(status: int) -> NoReturn:
    """Flush the standard streams and end the process with ``status`` (``os._exit``)."""
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if f is not None:
                f.flush()
    os._exit(status)


def end(status: int) -> NoReturn:
    """Leave the process with ``status`` the way Python's exit would (library threads joined,
    ``atexit`` functions run, the standard streams flushed), with :func:`finishing`'s handler
    still in place, and then ``os._exit``. Past those steps Python's teardown puts the default
    signal handlers back and goes on for 0.2-0.8 s with jax loaded (freeing modules): a stopping
    signal there ended a finished command by its default action, without a line (exit 143, 129,
    138: the caller could not tell that the outputs were complete). Nothing of the command is
    left to that teardown: every file is written and closed through ``fileio`` before here."""
    if status != 0 and not may_exit(status):  # one process of several ending alone: at once
        flush_and_exit(status)
    shutdown = getattr(threading, "_shutdown", None)  # joins threads as Python's exit does
    if shutdown is None or threading.current_thread() is not threading.main_thread():
        sys.exit(status)
    shutdown()
    if status == 0 and not may_exit(status):  # the processes' end together, signals heard
        flush_and_exit(status)
    atexit._run_exitfuncs()
    flush_and_exit(status)


@contextlib.contextmanager
def stop_promptly(prog: str, grace: float = 2.0):
    """While the block runs, a stopping signal ends the process within ``grace`` seconds even
    when the main thread is inside a long call into C++ (an XLA compilation of minutes), where
    Python's handler, and so :func:`interrupts`' ``KeyboardInterrupt``, waits for the call to
    return (before: ``aot`` stopped 70 s after a SIGUSR1). For blocks that leave nothing
    half-written (they write their outputs after the block). The C-level handler's wake-up byte
    (``signal.set_wakeup_fd``) reaches a watcher thread at once; it gives the main thread
    ``grace`` seconds to unwind as usual, then prints the one line and exits with 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        old = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # not the main thread of the main interpreter
        os.close(read)
        os.close(write)
        yield
        return
    stop, stopping = threading.Event(), {int(x) for x in STOP_SIGNALS}

    def watch():
        while not stop.is_set():
            try:
                data = os.read(read, 64)
            except OSError:
                return
            names = [signal.Signals(b).name for b in data if b in stopping]
            if names and not stop.wait(grace):
                _STOPPING.set()
                exit_interrupted(interrupted_line(prog, f"({names[0]})"))

    watcher = threading.Thread(target=watch, daemon=True, name="emit-stop-promptly")
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        signal.set_wakeup_fd(old)
        os.close(write)  # ends the watcher's read
        watcher.join(timeout=1)
        os.close(read)


def finishing(prog: str, status: int) -> None:
    """From the moment a command's work is over until its process is gone (library threads
    shutting down, Python's exit), a stopping signal ends it with one line saying so, instead of
    killing it silently (exit 143, 129, 138: a caller could not tell whether the outputs were
    complete)."""
    def late(signum, frame):
        ended(prog, signal.Signals(signum).name, status)
    late.finishing = True  # (an :func:`interrupts` block ending leaves it in place)
    _on_stop_signals(late)


def _on_stop_signals(handler) -> None:
    """``handler`` for every stopping signal the process does not ignore (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:
                signal.signal(s, handler)


def after_the_line() -> None:
    """Once an interrupted command has printed its line and is on its way out (its exit steps:
    library threads, ``atexit``): a further stopping signal ends it at once, without another
    word (before: a second Ctrl-C there printed the traceback of whatever exit step it landed
    in, jax's ``clean_up`` through :func:`_early_signal`)."""
    _on_stop_signals(lambda signum, frame: os._exit(INTERRUPTED))


def finished(prog: str) -> None:
    """Called by a command once its outputs are written, before its closing lines: a
    stopping signal from here on says that the work was done (:func:`finishing`), where it
    said "nothing half-written is left" of a complete output (a signal as the summary line was
    printed, before the command returned). Only in a command's own process (:func:`command`):
    a ``main`` called in-process (:func:`run`, the tests) leaves the signals as they were."""
    if _COMMAND.is_set():
        finishing(prog, 0)


def ended(prog: str, signame: str, status: int) -> NoReturn:
    """Exit 130 with the line of a signal that came once the command's work was over
    (:func:`finishing`)."""
    _STOPPING.set()
    exit_interrupted(interrupted_line(
        prog, f"({signame}) as it ended", "it had finished, and what it wrote is complete"
        if status == 0 else f"it was ending with exit status {status}"))


def skip_absent_tpu() -> None:
    """Do not start the TPU runtime on a host that has no TPU chip.

    With libtpu installed (the ``test`` and ``tpu-aot`` extras) jax tries its TPU backend first
    whatever the host, and libtpu, finding no chip, writes five lines of start-up warnings
    (``TPU_ACCELERATOR_TYPE``, ``InitGoogle``, ``TPU_WORKER_HOSTNAMES``) straight to stderr:
    a command's one error line became six to eight. When the PCI bus shows no TPU chip (jax's
    own test, ``hardware_utils.num_available_tpu_chips_and_device_id``), jax's TPU backend
    factory is replaced by one that fails quietly, as a platform that cannot start does (the
    platform stays known: flax and pallas register TPU lowerings when imported). When
    ``JAX_PLATFORMS`` names tpu, it fails as that platform does (the command's one
    ``JAX_PLATFORMS=tpu: JAX cannot start that platform`` line, without libtpu's five). Nothing
    changes when ``JAX_PLATFORMS`` names other platforms only (or ``jax_platforms`` is set in
    code), when ``JAX_FORCE_TPU_INIT`` is set, when libtpu is not installed, or once a backend
    has started; compiling for an abstract TPU slice
    (``python -m emit_jax.aot``) does not go through the backend and is unaffected."""
    named = os.environ.get("JAX_PLATFORMS", "")
    if "JAX_FORCE_TPU_INIT" in os.environ or (
            named and "tpu" not in [p.strip() for p in named.lower().split(",")]):
        return
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return
    try:
        import jax
        from jax._src import hardware_utils, xla_bridge

        if ((jax.config.jax_platforms and not named) or xla_bridge._backends
                or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0):
            return
        import dataclasses

        reg = xla_bridge._backend_factories.get("tpu")
        if reg is None:
            return
        # the platform stays known (flax and pallas register TPU lowerings when imported);
        # only starting its backend is skipped, quietly, as for any platform that fails; when
        # JAX_PLATFORMS names tpu, it fails as that platform would, without libtpu's lines
        xla_bridge._backend_factories["tpu"] = dataclasses.replace(
            reg, factory=_no_tpu_backend, fail_quietly=not named)
    except (ImportError, AttributeError, OSError, TypeError):  # another jax: its lines stay
        return


def _no_tpu_backend():
    raise RuntimeError("no TPU chip on this host's PCI bus")


class _Stdout:
    """``sys.stdout`` while a command runs: what it prints goes to the real stream until a write
    or a flush fails (a full disk behind ``> file``, ``> /dev/full``, a reader gone from a pipe:
    ``| head``); from then on printing stops and the command goes on, its files written, and
    :attr:`failed` keeps the error for the one line it ends with. Before, the first ``print``
    after the failure raised a bare ``[Errno 28] No space left on device`` that did not say
    standard output was full, and the command stopped there: a training's results.json, an
    evaluation's table never written, although the disk with the workdir had room."""

    def __init__(self, stream):
        self._stream = stream
        self.failed: OSError | None = None

    def _fail(self, e: OSError) -> None:
        if self.failed is None:
            self.failed = e
            with contextlib.suppress(OSError, ValueError, AttributeError):
                # what is still buffered goes nowhere, so the exit's own flush is quiet
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self._stream.fileno())
                os.close(null)

    def write(self, text):
        if self.failed is None:
            try:
                return self._stream.write(text)
            except OSError as e:
                self._fail(e)
        return len(text)

    def flush(self):
        if self.failed is None:
            try:
                self._stream.flush()
            except OSError as e:
                self._fail(e)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _Closed:
    """The standard output of a command started with it closed (``>&-``)."""

    def write(self, text):
        raise OSError(errno.EBADF, "closed (the command was started with >&-)")

    def flush(self):
        pass


def closed_stderr() -> None:
    """A command started with its standard error closed (``2>&-``): Python makes
    ``sys.stderr`` None, and ``print(..., file=sys.stderr)`` then prints to standard output
    (an error line in the file the user sent the output to). Its lines go nowhere instead."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the process


def stdout_line(e: OSError) -> str:
    """The line a command whose standard output failed ends with (exit 2)."""
    why = e.strerror or str(e) or type(e).__name__
    gone = " (the reader of the pipe went away)" if isinstance(e, BrokenPipeError) else ""
    return (f"standard output: {why}{gone}; what it printed from there on is lost, and the "
            "command went on to the end (the files it writes are complete)")


@contextlib.contextmanager
def stdout_guard():
    """While the block runs ``sys.stdout`` is a :class:`_Stdout` (unless it is closed or one
    already); yields it, or None. After the block, ``guard.failed`` says whether printing
    failed: the command then ends with :func:`stdout_line` and exit 2."""
    out = sys.stdout
    if isinstance(out, _Stdout):  # a command run by a command
        yield None
        return
    # closed (>&-): Python makes it None and print() dropped every line without a word
    sys.stdout = guard = _Stdout(out if out is not None else _Closed())
    try:
        yield guard
        guard.flush()
    finally:
        if sys.stdout is guard:
            sys.stdout = out


def stdout_ending(guard, status: int, prog: str) -> int:
    """``status``, or 2 after the line of :func:`stdout_line` when the :func:`stdout_guard`
    ``guard`` saw printing fail in a command that otherwise succeeded."""
    if guard is not None and guard.failed is not None and status == 0:
        print(f"{prog}: error: {stdout_line(guard.failed)}", file=sys.stderr, flush=True)
        return 2
    return status


def _run(main, argv, prog: str, final: bool = False) -> int:
    with stdout_guard() as guard:
        status = _run_main(main, argv, prog, final)
    return stdout_ending(guard, status, prog)


def _run_main(main, argv, prog: str, final: bool = False) -> int:
    def interrupted(name: str) -> int:
        line = interrupted_line(prog, f"({name or 'SIGINT'})")
        if final:
            _STOPPING.set()
            exit_interrupted(line)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(line, file=sys.stderr)
        return INTERRUPTED

    received: list[str] = []
    status = None
    try:
        with interrupts() as received:
            try:
                no_x64(prog)
                skip_absent_tpu()
                status = int(main(argv) or 0)
                if final:  # from here a signal says that the work was done
                    finishing(prog, status)
            except KeyboardInterrupt as e:
                if final and status is not None:  # between main's return and finishing
                    ended(prog, str(e) or "SIGINT", status)
                return interrupted(str(e) or (received[0] if received else ""))
            except USER_ERRORS as e:
                if received:  # a user error the interrupt caused (a read cut short)
                    return interrupted(received[0])
                return fail(prog, e)
            except Exception as e:
                if received:  # the KeyboardInterrupt, wrapped in a library's own error
                    return interrupted(received[0])
                if (line := runtime_error(e, prog)) is not None:
                    print(f"{prog}: error: {line}", file=sys.stderr)
                    return 2
                raise
    except KeyboardInterrupt as e:  # a signal as the block ended
        if final and status is not None:
            ended(prog, str(e) or "SIGINT", status)
        return interrupted(str(e))
    if received:  # a KeyboardInterrupt main lost (swallowed where it was raised)
        return interrupted(received[0])
    return status
