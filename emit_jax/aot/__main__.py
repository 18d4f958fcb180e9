"""``python -m emit_jax.aot``: see :mod:`emit_jax.aot.command`; jax on the CPU unless
``JAX_PLATFORMS`` says otherwise (the TPU is abstract: nothing runs on it)."""

import os
import sys

from emit_jax.aot.command import main

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
