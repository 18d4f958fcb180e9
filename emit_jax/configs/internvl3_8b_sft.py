"""EMIT stage 1 with the paper's settings (docs/reference/emit.md 10, 13) on InternVL3-8B.

    python -m emit_jax.convert --hf ~/models/InternVL3-8B-hf --out ~/ckpt/internvl3_8b
    python -m emit_jax.data.build --source ~/data/mpdd --out ~/data/stage1.jsonl --stage 1 \
        --checkpoint ~/ckpt/internvl3_8b
    python -m emit_jax.train --config configs/internvl3_8b_sft.py \
        --config.init_from=~/ckpt/internvl3_8b --config.data.source=~/data/mpdd --workdir runs/emit8b

Trainable: soft prompt + heat-map projector (~93k parameters); LLM, ViT and mlp1 frozen.
AdamW (0.9, 0.95), lr 1e-5, weight decay 1e-4, cosine with 3% warm-up, global batch 64,
2 epochs, bf16, up to 6 tiles per image, neighbor_dis 6, CE layers 4/8/16/20.
"""

from emit_jax.configs.common import base_config, check_variant


def get_config(arg=None):
    check_variant(arg)
    c = base_config()
    c.arch = "internvl3_8b"
    c.init_from = ""  # required: a converted InternVL3-8B checkpoint or its HF folder
    c.param_dtype = "bfloat16"
    c.stages = ("sft",)
    c.data.source = ""  # required: an MVTec-style training dataset (e.g. MPDD)
    c.data.max_tiles = 6
    c.data.text_samples = False
    c.data.dk_sentences = 0  # the full domain knowledge, as EMIT
    c.data.domain_knowledge = True
    c.data.length_buckets = (2048, 4096, 6144, 8192, 10240)
    c.sft.update(dict(steps=6000, batch_size=64, lr=1e-5, warmup_ratio=0.03, weight_decay=1e-4,
                      b1=0.9, b2=0.95, clip_norm=1.0, micro_batch_size=16))
    c.emit.update(dict(bn_mode="official"))
    # fits 8 x 80 GB (fsdp=8) and a TPU v5p-8 (4 chips, fsdp=4) with headroom: gradient
    # accumulation in micro-batches of 16 rows (the paper: 4 per GPU x 2), layer remat, LLM
    # attention in 512-query chunks, the ViT 64 tiles at a time (docs/MEMORY_PLAN.md; check with
    # python -m emit_jax.plan and python -m emit_jax.aot)
    c.memory.update(dict(remat=True, attention_chunk=512, vit_chunk=64))
    c.checkpoint_every = 2000
    c.eval_limit = 0
    return c
