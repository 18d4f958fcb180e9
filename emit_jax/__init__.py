"""emit_jax: EMIT (difficulty-aware GRPO for industrial anomaly detection) in JAX / Flax NNX.

Commands: ``python -m emit_jax.train`` (base / stage-1 SFT / stage-2 GRPO),
``python -m emit_jax.evaluate`` (MMAD or MVTec-style data), ``python -m emit_jax.data.build``
(EMIT's JSONL), ``python -m emit_jax.data.embedded`` (the default dataset),
``python -m emit_jax.convert`` / ``python -m emit_jax.export`` (Orbax <-> Hugging Face),
``python -m emit_jax.visualize heatmap``, ``python -m bench heatmap`` and
``python -m emit_jax.demo``. Library: ``emit_jax.hf.load`` / ``save``, ``emit_jax.models``,
``emit_jax.ops.sampling.generate``, ``emit_jax.ops.heatmap.anomaly_map``, ``emit_jax.rl``.
"""

__version__ = "0.1.0"

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # ``python -m emit_jax.<command>``: runpy imports this package first
    from emit_jax.cli import check_jax_environment as _check_jax_environment
    from emit_jax.cli import interrupt_early as _interrupt_early

    from emit_jax.cli import closed_stderr as _closed_stderr

    _closed_stderr()  # 2>&-: its lines go nowhere (print(file=None) wrote them to stdout)
    _interrupt_early()  # a Ctrl-C while the command's modules load: one line, exit 130
    _check_jax_environment()  # a JAX_* variable JAX refuses: one line, before any traceback
