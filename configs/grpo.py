"""EMIT end to end on the embedded default dataset (tiny architecture, 2-core CPU): the main job.

    python -m emit_jax.train --config configs/grpo.py --workdir runs/grpo

Stages: base (the tiny MLLM learns the tasks) -> sft (EMIT stage 1: soft prompt + projector)
-> grpo (EMIT stage 2: difficulty-aware GRPO, LoRA r 8 / alpha 32 on the LLM and ViT linears,
mlp1 + projector + soft prompt in full). A stage already finished in the workdir is loaded, not
rerun (so this starts from the SFT checkpoint when there is one). Prints held-out accuracy per
task and exports runs/grpo/hf.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ml_collections  # noqa: E402

from common import base_config  # noqa: E402

LORA_TARGETS = (r".*(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj)"
                r"|attention/(q_proj|k_proj|v_proj|projection_layer)|mlp/(fc1|fc2))")


def grpo_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=40, prompts_per_step=2, G=4, max_new_tokens=40,
        temperature=1.0, top_k=50, top_p=0.9,
        beta=5e-3, eps_low=0.2, eps_high=0.2, kl="k3", agg="sequence_mean",
        resample=True, max_resample_times=3, reweight=True,
        reward_names=("accuracy", "cosine", "format", "repetition"),
        reward_weights=(3.0, 1.0, 1.0, 1.0),
        lr=5e-4, warmup_ratio=0.01, weight_decay=0.1,
        lora=ml_collections.ConfigDict(dict(rank=8, alpha=32.0, dropout=0.0, targets=LORA_TARGETS,
                                            weight_qtype="")),
    ))


def get_config(arg=None):
    c = base_config()
    c.stages = ("base", "sft", "grpo")
    c.grpo = grpo_section()
    if arg == "smoke":  # a few steps of each stage (CI)
        c.base.steps, c.sft.steps, c.grpo.steps = 3, 2, 2
        c.grpo.max_new_tokens, c.eval_limit, c.log_every, c.eval_max_new_tokens = 8, 4, 1, 8
    elif arg == "plain":  # the paper's "GRPO" baseline: no resampling, no reweighting
        c.grpo.resample, c.grpo.reweight = False, False
    return c
