"""Reinforcement learning for EMIT stage 2: verifiable rewards (``rewards``) and GRPO math."""

from emit_jax.rl import adfm  # noqa: E402  (registers adfm_cls / adfm_loc / adfm_fmt)

__all__ = ["adfm"]
