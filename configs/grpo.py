"""EMIT end to end on the embedded default dataset (tiny architecture, 2-core CPU): the main job.

The recipe lives in `emit_jax/configs/grpo.py`; this file names it for `--config configs/grpo.py`."""

from emit_jax.configs.grpo import get_config  # noqa: F401
