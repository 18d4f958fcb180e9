"""Shared command-line plumbing: bad input becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from typing import Callable

from emit_jax.data.image import ImageError
from emit_jax.data.mvtec import DataError
from emit_jax.hf import CheckpointError
from emit_jax.models.config import ConfigError


def _user_errors() -> tuple[type[BaseException], ...]:
    errors = [ConfigError, CheckpointError, DataError, ImageError, OSError]
    for mod, name in (("emit_jax.data.tokenizer", "TokenizerError"),
                      ("emit_jax.data.mmad", "MMADError")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


USER_ERRORS = _user_errors()


def message(e: BaseException) -> str:
    """The one-line text of a user error (an ``OSError`` as ``<file>: <strerror>``)."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
        prog: str = "emit_jax") -> int:
    """Call ``main(argv)``; a user error (bad config or checkpoint, a path that is missing,
    exists already, is unwritable, a full disk) prints ``prog: error: <message>`` and returns 2."""
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as e:
        print(f"{prog}: error: {message(e)}", file=sys.stderr)
        return 2
