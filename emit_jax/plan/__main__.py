"""``python -m emit_jax.plan``: see :mod:`emit_jax.plan.command`; on the CPU unless
``JAX_PLATFORMS`` says otherwise (nothing is allocated). Run through :func:`emit_jax.cli.command`:
Ctrl-C / SIGTERM is one line, exit 130."""

import os

from emit_jax import cli
from emit_jax.plan.command import PROG, main

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cli.command(main, prog=PROG)
