"""Seeds: the check every entry point applies, and the independent random stream of each
image (or other keyed draw) under a seed."""

from __future__ import annotations

import zlib

import numpy as np


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A random stream for ``keys`` under ``seed``; independent of Python's hash seed."""
    entropy = [int(seed)] + [k if isinstance(k, int) else _key(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
