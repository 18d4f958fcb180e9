"""AD-FM alone on the embedded default dataset (tiny architecture, 2-core CPU).

The recipe lives in `emit_jax/configs/adfm.py`; this file names it for `--config configs/adfm.py`."""

from emit_jax.configs.adfm import get_config  # noqa: F401
