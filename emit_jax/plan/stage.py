"""A stage's step as the plan counts it: :class:`Setup` (batch, lengths, tiles, LoRA, memory
switches, micro-batches) read off a config by :func:`stage_setup`, and the step's image tiles
padded as the pipeline pads them."""

from __future__ import annotations

import dataclasses
from typing import Any

from emit_jax.errors import ConfigError, PlanError, message
from emit_jax.limits import MAX_TILES
from emit_jax.training.config import LORA_STAGES, STAGES, GRPOConfig, check_int


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a stage's plan depends on (``dataclasses.replace`` makes what-ifs)."""
    stage: str
    mesh: tuple  # (data, fsdp, tensor)
    batch: int  # sequences per optimizer step
    prompt_len: int
    new_tokens: int  # grpo completion length
    label_tokens: int
    images_per_sample: int
    max_tiles: int
    tile_bucket: int
    lora_rank: int = 0
    lora_targets: str = ""
    qtype: str = ""
    tile_size: int | None = None
    reference: str = "shared"
    train_vision: bool = True
    num_soft_tokens: int = 9
    max_readout: bool = False
    peak_location: bool = False
    hot_patches: int = 0
    use_contrastive: bool = True
    rotations: int = 4
    ce_layers: int = 4
    remat: bool = False  # memory.remat: every decoder / ViT layer rematerialised
    attention_chunk: int = 0  # memory.attention_chunk: LLM queries in chunks of this many
    micro_batch: int = 0  # rows per micro-batch of the train step (0 = the whole batch)
    vit_chunk: int = 0  # memory.vit_chunk: ViT tiles per chunk (0 = all at once)

    @property
    def micro_batches(self) -> int:
        mb = self.micro_batch
        return self.batch // mb if 0 < mb < self.batch and self.batch % mb == 0 else 1

    @property
    def train_rows(self) -> int:
        """Sequences whose activations the train step holds at once (one micro-batch)."""
        return self.batch // self.micro_batches


def stage_setup(cfg, stage: str, mesh: tuple, *, prompt_len: int | None = None,
                label_tokens: int = 128, images_per_sample: int = 2,
                reference: str = "shared") -> Setup:
    if stage not in STAGES:
        raise PlanError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    if stage not in cfg or cfg.get(stage) is None:
        raise PlanError(f"config has no {stage!r} section")
    sec = cfg[stage]
    buckets = tuple(cfg.data.get("length_buckets", ()) or ())
    if prompt_len is not None and prompt_len < 1:
        raise PlanError(f"--prompt_len {prompt_len}: must be positive")
    p = int(prompt_len or (max(buckets) if buckets else 0))
    if p < 1:
        raise PlanError("no prompt length: the config has no data.length_buckets; pass --prompt_len")
    if label_tokens < 1:
        raise PlanError(f"--label_tokens {label_tokens}: must be positive")
    try:
        max_tiles = check_int("data.max_tiles", cfg.data.get("max_tiles", 1), low=1,
                              high=MAX_TILES)
    except ConfigError as e:  # before: an unbounded value hung the tile-grid search
        raise PlanError(message(e)) from None
    kw: dict[str, Any] = {}
    g = GRPOConfig.from_section(cfg.grpo) if stage in LORA_STAGES else None
    if stage == "grpo":
        batch = g.rows
        kw.update(new_tokens=g.max_new_tokens, tile_bucket=batch * 2 * max_tiles)
    else:
        if not sec.get("batch_size"):
            raise PlanError(f"config section {stage!r} has no batch_size")
        batch = int(sec.batch_size)
        kw.update(new_tokens=0, tile_bucket=4)
    if g is not None:
        tile = cfg.grpo.lora.get("tile_size")  # QLoRA's scale tiles (qwix), plan only
        kw.update(lora_rank=g.lora.rank, lora_targets=g.lora.targets, qtype=g.lora.weight_qtype,
                  tile_size=int(tile) if tile else None)
    emit = cfg.get("emit") or {}
    mem = cfg.get("memory") or {}
    try:
        remat, chunk = mem.get("remat", False), int(mem.get("attention_chunk", 0) or 0)
    except (TypeError, ValueError):
        raise PlanError(f"memory.attention_chunk {mem.get('attention_chunk')!r}: not an integer") from None
    if not isinstance(remat, (bool, int)) or isinstance(remat, int) and remat not in (0, 1):
        raise PlanError(f"memory.remat {remat!r}: expected True or False")
    if chunk < 0:
        raise PlanError(f"memory.attention_chunk {chunk}: must be >= 0 (0 = off)")
    kw.update(remat=bool(remat), attention_chunk=chunk)
    mb = int(sec.get("micro_batch_size", 0) or 0)
    if mb < 0 or (0 < mb < batch and batch % mb):
        raise PlanError(f"{stage}.micro_batch_size {mb}: must be 0 or divide the step's "
                        f"{batch} rows")
    try:
        vit_chunk = int(mem.get("vit_chunk", 0) or 0)
    except (TypeError, ValueError):
        raise PlanError(f"memory.vit_chunk {mem.get('vit_chunk')!r}: not an integer") from None
    if vit_chunk < 0:
        raise PlanError(f"memory.vit_chunk {vit_chunk}: must be >= 0 (0 = off)")
    kw.update(micro_batch=mb, vit_chunk=vit_chunk)
    return Setup(stage=stage, mesh=tuple(mesh), batch=batch, prompt_len=p,
                 label_tokens=int(label_tokens), images_per_sample=int(images_per_sample),
                 max_tiles=max_tiles, reference=reference,
                 train_vision=bool(sec.get("train_vision", True)),
                 num_soft_tokens=int(emit.get("num_soft_tokens", 9)),
                 max_readout=bool(emit.get("max_readout", False)),
                 peak_location=bool(emit.get("peak_location", False)),
                 hot_patches=int(emit.get("hot_patches", 0)),
                 use_contrastive=bool(emit.get("use_contrastive", True)),
                 # reference ViT passes: the rot90 copies of each turn (emit.reference_turns;
                 # of one with emit.align_turn; emit.feature_turns turns features, no ViT pass)
                 rotations=int(emit.get("rotations", 4)) * (
                     1 if emit.get("align_turn", False) else int(emit.get("reference_turns", 1))),
                 **kw)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tiles_per_sequence(mcfg, s: Setup) -> tuple[int, int]:
    """``(asked, planned)`` image tiles of one sequence: ``images_per_sample`` images of
    ``max_tiles`` tiles (+ the thumbnail), and as many of them as the prompt holds."""
    if s.stage == "warmup" or s.images_per_sample <= 0:
        return 0, 0
    per_image = s.max_tiles + 1 if s.max_tiles > 1 else 1  # + the thumbnail
    asked = s.images_per_sample * per_image
    return asked, min(asked, s.prompt_len // mcfg.tokens_per_tile)


def _tiles(mcfg, s: Setup) -> int:
    """Image tiles of one step, padded as the pipeline pads them."""
    per_seq = tiles_per_sequence(mcfg, s)[1]
    n = s.batch * per_seq
    bucket = max(1, s.tile_bucket)
    return max(bucket, _ceil_div(n, bucket) * bucket) if n else 0
