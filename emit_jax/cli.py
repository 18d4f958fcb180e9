"""Shared command-line plumbing: bad input becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import signal
import sys
import threading
from typing import Callable

from emit_jax.errors import USER_ERRORS, message  # noqa: F401 (re-exported)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors (an unknown flag, a missing or malformed value)
    raise ``error_type(message)`` instead of printing the usage and exiting: the command's
    ``main`` reports them as it reports any other bad input, in one line (:func:`fail`), exit 2."""

    def __init__(self, *args, error_type: type[Exception] = ValueError, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_type = error_type
        self._given: set[str] = set()
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def error(self, message):  # one line, exit 2 (by the caller)
        raise self.error_type(message)

    def parse_known_args(self, args=None, namespace=None):
        self._given = set()  # the options seen in this parse (_StoreOnce)
        return super().parse_known_args(args, namespace)

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


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number ``>= low``."""
    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"  # argparse names the type in some messages
    return parse


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


def fail(prog: str, e: BaseException) -> int:
    """Print ``prog: error: <message>`` (one line) on stderr; the exit status of bad input, 2."""
    print(f"{prog}: error: {message(e)}", file=sys.stderr)
    return 2


#: the exit status of a command stopped by SIGINT / SIGTERM (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises ``KeyboardInterrupt`` while the block runs (main thread only; a SIGTERM
    the process was started to ignore stays ignored), so it unwinds like Ctrl-C: files and
    folders being written atomically are removed instead of left behind as ``.tmp-*``."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
        prog: str = "emit_jax") -> int:
    """Call ``main(argv)``; a user error (bad config or checkpoint, a path that is missing,
    exists already, is unwritable, a full disk) prints ``prog: error: <message>`` and returns 2.
    Ctrl-C (SIGINT) or SIGTERM prints ``prog: interrupted (<signal>); nothing half-written is
    left`` and returns 130: outputs are written under temporary names and renamed when
    complete, and those are removed as the interrupt unwinds."""
    try:
        with _sigterm_as_interrupt():
            return int(main(argv) or 0)
    except USER_ERRORS as e:
        return fail(prog, e)
    except KeyboardInterrupt as e:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(f"{prog}: interrupted ({str(e) or 'SIGINT'}); nothing half-written is left",
              file=sys.stderr)
        return INTERRUPTED
