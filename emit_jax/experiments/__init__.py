"""The experiments behind docs/training.md's lab notes, each ``python -m
emit_jax.experiments.<name>``."""

from __future__ import annotations

import sys
from typing import Sequence


def given(argv: Sequence[str] | None, flag: str) -> bool:
    """Whether ``flag`` (``--arch``) is on the command line ``argv`` (``None``: ``sys.argv``),
    as ``--arch X`` or ``--arch=X``."""
    args = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + "=") for a in args)


def warn_unused_with_checkpoint(argv: Sequence[str] | None, flags: Sequence[str]) -> None:
    """One ``warning:`` line naming the ``flags`` given beside ``--checkpoint``, which builds
    no model of its own (before: ignored without a word, as train warns of ``--config.arch``
    beside ``init_from``)."""
    named = [f for f in flags if given(argv, f)]
    if named:
        print(f"warning: {', '.join(named)}: not used, the model (its architecture and weights) "
              "comes from --checkpoint", file=sys.stderr, flush=True)
