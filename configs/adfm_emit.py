"""AD-FM's rewards and three-stage answers with EMIT's difficulty-aware GRPO (embedded default).

The recipe lives in `emit_jax/configs/adfm_emit.py`; this file names it for `--config configs/adfm_emit.py`."""

from emit_jax.configs.adfm_emit import get_config  # noqa: F401
