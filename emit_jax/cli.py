"""Shared command-line plumbing: bad input becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
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
