"""emit_jax: EMIT (difficulty-aware GRPO for industrial anomaly detection) in JAX / Flax NNX.

Entry points so far: ``emit_jax.hf.load`` / ``emit_jax.hf.save`` (Hugging Face interop),
``python -m emit_jax.convert`` / ``python -m emit_jax.export`` (Orbax <-> HF),
``emit_jax.ops.sampling.generate`` and ``python -m emit_jax.demo``.
"""

__version__ = "0.1.0"
