"""InternVL in Flax NNX: InternViT, pixel shuffle + mlp1, Qwen2 with a KV cache."""

from emit_jax.models.architectures import ARCHITECTURES, get_config
from emit_jax.models.config import ConfigError, InternVLConfig, TextConfig, VisionConfig
from emit_jax.models.internvl import InternVL, pixel_shuffle
from emit_jax.models.qwen2 import KVCache

__all__ = ["ARCHITECTURES", "get_config", "ConfigError", "InternVLConfig", "TextConfig",
           "VisionConfig", "InternVL", "pixel_shuffle", "KVCache"]
