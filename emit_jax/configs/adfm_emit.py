"""AD-FM's rewards and three-stage answers with EMIT's difficulty-aware GRPO (embedded default).

    python -m emit_jax.train --config configs/adfm_emit.py --workdir runs/adfm_emit

``configs/adfm.py`` with response resampling (a group where no completion has R_cls = 1 is
regenerated up to ``max_resample_times``) and advantage reweighting w = 1 + (#incorrect)/G,
"correct" meaning R_cls = 1 (``grpo.correct = "adfm_cls"``).
"""

from emit_jax.configs.adfm import get_config as adfm_config


def get_config(arg=None):
    c = adfm_config(arg)
    c.grpo.resample, c.grpo.reweight = True, True
    c.grpo.correct = "adfm_cls"
    return c
