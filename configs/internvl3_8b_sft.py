"""EMIT stage 1 with the paper's settings (docs/reference/emit.md 10, 13) on InternVL3-8B.

The recipe lives in `emit_jax/configs/internvl3_8b_sft.py`; this file names it for `--config configs/internvl3_8b_sft.py`."""

from emit_jax.configs.internvl3_8b_sft import get_config  # noqa: F401
