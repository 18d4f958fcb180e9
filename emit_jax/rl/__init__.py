"""Reinforcement learning for EMIT stage 2: verifiable rewards (``rewards``) and GRPO math."""
