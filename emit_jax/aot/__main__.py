"""``python -m emit_jax.aot``: see :mod:`emit_jax.aot.command`; jax on the CPU unless
``JAX_PLATFORMS`` says otherwise (the TPU is abstract: nothing runs on it). Run through
:func:`emit_jax.cli.command`: Ctrl-C / SIGTERM is one line, exit 130."""

import os

from emit_jax import cli
from emit_jax.aot.command import PROG, main

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cli.command(main, prog=PROG)
