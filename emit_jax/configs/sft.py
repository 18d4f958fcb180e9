"""EMIT stage 1 on the embedded default dataset (tiny architecture, 2-core CPU).

    python -m emit_jax.train --config configs/sft.py --workdir runs/sft

Runs the base-model stage (the tiny MLLM learns the four tasks without soft prompt or
contrastive tokens), then stage 1 (soft prompt + heat-map projector, MLLM frozen), then prints
held-out accuracy per task and exports the model to runs/sft/hf.
"""

from emit_jax.configs.common import base_config, check_variant, embedded_recipe


def get_config(arg=None):
    check_variant(arg, "smoke")
    c = embedded_recipe(base_config())
    c.stages = ("base", "sft")
    c.eval_think = False
    c.eval_max_new_tokens = 8
    if arg == "smoke":  # a few steps of each stage (CI)
        c.base.steps, c.sft.steps, c.eval_limit, c.log_every = 3, 2, 4, 1
        c.sft.fresh_datasets, c.base.fresh_datasets, c.eval_unseen = 0, 0, 0
    return c
