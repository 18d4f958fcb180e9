"""``python -m emit_jax.plan``: see :mod:`emit_jax.plan.command`; on the CPU unless
``JAX_PLATFORMS`` says otherwise (nothing is allocated)."""

import os
import sys

from emit_jax.plan.command import main

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
