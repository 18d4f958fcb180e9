"""EMIT stage 2 with the paper's settings (docs/reference/emit.md 11, 13) on the stage-1 checkpoint.

The recipe lives in `emit_jax/configs/internvl3_8b_grpo.py`; this file names it for `--config configs/internvl3_8b_grpo.py`."""

from emit_jax.configs.internvl3_8b_grpo import get_config  # noqa: F401
