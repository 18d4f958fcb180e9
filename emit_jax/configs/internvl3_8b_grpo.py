"""EMIT stage 2 with the paper's settings (docs/reference/emit.md 11, 13) on the stage-1 checkpoint.

    python -m emit_jax.train --config configs/internvl3_8b_grpo.py \
        --config.init_from=runs/emit8b/sft/model --config.data.source=~/data/mpdd \
        --workdir runs/emit8b_grpo

LoRA r 8 / alpha 32 on the LLM (q/k/v/o, gate/up/down) and ViT (qkv, proj, fc1, fc2) linears;
mlp1, projector and soft prompt trained in full. 8 prompts x G 8 per step, temperature 1.0,
top-k 50, top-p 0.9, 512 new tokens, beta 5e-3 (k3), eps 0.2 / 0.2, per-sequence loss mean,
rewards acc 3 / cosine 1 / format 1 / repetition 1, resampling up to 3 times, difficulty
weights; AdamW (0.9, 0.95), lr 1e-5, weight decay 0.1, cosine with 1% warm-up.
"""

from emit_jax.configs.common import base_config, check_variant
from emit_jax.configs.grpo import grpo_section


def get_config(arg=None):
    check_variant(arg)
    c = base_config()
    c.arch = "internvl3_8b"
    c.init_from = ""  # required: the stage-1 model checkpoint
    c.param_dtype = "bfloat16"
    c.stages = ("grpo",)
    c.data.source = ""
    c.data.max_tiles = 6
    c.data.dk_sentences = 0
    c.data.domain_knowledge = True
    c.data.length_buckets = (2048, 4096, 6144, 8192, 10240)
    c.grpo = grpo_section()
    c.grpo.bn = "train"  # the official code's BatchNorm in stage 2
    c.grpo.update(dict(steps=1000, prompts_per_step=8, G=8, max_new_tokens=512, lr=1e-5,
                       warmup_ratio=0.01, weight_decay=0.1, micro_batch_size=16))
    c.emit.update(dict(bn_mode="official"))
    # fits 8 x 80 GB (fsdp=8) and a TPU v5p-8 (4 chips, fsdp=4) with headroom: gradient
    # accumulation in micro-batches of 16 rows (the paper: 4 per GPU x 2), layer remat, LLM
    # attention in 512-query chunks, the ViT 64 tiles at a time (docs/MEMORY_PLAN.md; check with
    # python -m emit_jax.plan and python -m emit_jax.aot)
    c.memory.update(dict(remat=True, attention_chunk=512, vit_chunk=64))
    c.checkpoint_every = 500
    c.eval_limit = 0
    return c
