"""EMIT stage 1 on the embedded default dataset (tiny architecture, 2-core CPU).

The recipe lives in `emit_jax/configs/sft.py`; this file names it for `--config configs/sft.py`."""

from emit_jax.configs.sft import get_config  # noqa: F401
