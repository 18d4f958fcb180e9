"""Fault injection for the reliability tests; inert unless ``EMIT_FAULTS`` is set.

``EMIT_FAULTS`` is a comma-separated list of ``KIND@STAGE:STEP``:

- ``nan@STAGE:STEP`` — the batch of that step gets NaN inputs (SFT stages: its pixel tiles;
  GRPO: its advantages), so the step's loss and gradients are non-finite;
- ``kill_in_save@STAGE:STEP`` — the process kills itself with SIGKILL while the checkpoint of
  that step is being written (after Orbax has started it, before it is committed);
- ``kill_in_close@STAGE:STEP`` — the same as the stage's checkpoints are closed with ``STEP``
  the last one saved (its write awaited, after the training loop).

Each fault fires at most once per process. Nothing reads the variable outside these hooks.
"""

from __future__ import annotations

import os
import signal

_fired: set[str] = set()


def _parse(spec: str) -> set[tuple[str, str, int]]:
    out = set()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        try:
            kind, where = item.split("@")
            stage, step = where.split(":")
            out.add((kind, stage, int(step)))
        except ValueError:
            raise ValueError(f"EMIT_FAULTS: {item!r} is not KIND@STAGE:STEP") from None
    return out


def fires(kind: str, stage: str, step: int) -> bool:
    """Whether fault ``kind`` is set for ``stage`` at ``step`` (and has not fired yet)."""
    spec = os.environ.get("EMIT_FAULTS")
    if not spec:
        return False
    key = f"{kind}@{stage}:{step}"
    if (kind, stage, int(step)) in _parse(spec) and key not in _fired:
        _fired.add(key)
        return True
    return False


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
