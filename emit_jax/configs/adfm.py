"""AD-FM alone on the embedded default dataset (tiny architecture, 2-core CPU).

    python -m emit_jax.train --config configs/adfm.py --workdir runs/adfm

AD-FM (docs/reference/adfm.md): GRPO on the binary anomaly-discrimination decision with three-stage answers
(``<think>`` region boxes ``[x1, y1, x2, y2]`` in the model frame, ``<rethink>``, ``<answer>``)
and the fine-grained reward R_cls + R_loc + R_fmt (weights 1 / 1 / 1, R_loc normalised).

Stages: base (the tiny MLLM learns EMIT's four tasks and, from templated answers with the GT
boxes, AD-FM's format: a pretrained model brings that, a random one does not) -> grpo on the
AD-FM records (plain GRPO: no resampling, no reweighting; LoRA r 8 / alpha 32 as the EMIT
recipe, where AD-FM's 7B uses r 64 / alpha 128). No soft prompt, no contrastive tokens (AD-FM's
model is a plain MLLM). Prints the held-out table of the four tasks and the AD-FM evaluation
(accuracy, balanced accuracy, mean IoU of the predicted boxes, hit rate at IoU 0.1).
"""

from emit_jax.configs.common import check_variant
from emit_jax.configs.grpo import get_config as grpo_config

ADFM_REWARDS = ("adfm_cls", "adfm_loc", "adfm_fmt")


def get_config(arg=None):
    check_variant(arg, "smoke")
    c = grpo_config("smoke" if arg == "smoke" else None)
    c.stages = ("base", "grpo")
    c.data.adfm = True  # build the AD-FM record sets (boxes in the model frame)
    c.base.adfm = True  # the base stage also learns AD-FM's answer format
    g = c.grpo
    g.records = "adfm"
    g.reward_names, g.reward_weights = ADFM_REWARDS, (1.0, 1.0, 1.0)
    g.correct = "adfm_cls"  # "correct" = R_cls = 1 (metrics; resampling in adfm_emit.py)
    g.resample, g.reweight = False, False
    g.temperature = 0.9  # AD-FM's train_mmad.sh
    g.max_new_tokens = 64 if arg != "smoke" else 12
    # coordinates must lie inside the frame: tiny's 224 x 224 (AD-FM: < 505 for its 504 frame)
    g.reward_kwargs = dict(loc_variant="normalized", coord_limit=225, strict=False)
    c.eval_adfm = 100 if arg != "smoke" else 4  # AD-FM held-out questions evaluated
    # their generation budget (0: grpo.max_new_tokens); adfm_compare sets it on the other rows
    c.eval_adfm_tokens = 0
    return c
