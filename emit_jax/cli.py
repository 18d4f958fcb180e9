"""Shared command-line plumbing: bad input becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Callable

from emit_jax.errors import USER_ERRORS, message  # noqa: F401 (re-exported)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors (an unknown flag, a missing or malformed value)
    raise ``error_type(message)`` instead of printing the usage and exiting: the command's
    ``main`` reports them as it reports any other bad input, in one line (:func:`fail`), exit 2."""

    def __init__(self, *args, error_type: type[Exception] = ValueError, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_type = error_type

    def error(self, message):  # one line, exit 2 (by the caller)
        raise self.error_type(message)

    def add_subparsers(self, **kwargs):
        """Sub-commands' parsers report their usage errors the same way (one line)."""
        kwargs.setdefault("parser_class", functools.partial(type(self), error_type=self.error_type))
        return super().add_subparsers(**kwargs)


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


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
        prog: str = "emit_jax") -> int:
    """Call ``main(argv)``; a user error (bad config or checkpoint, a path that is missing,
    exists already, is unwritable, a full disk) prints ``prog: error: <message>`` and returns 2."""
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as e:
        return fail(prog, e)
