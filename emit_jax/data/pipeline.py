"""The input pipeline (grain): EMIT JSONL records -> model-ready batches.

Per record (:class:`RecordEncoder`): decode the images, InternVL dynamic tiling at the model's
tile size (``max_tiles``, thumbnail), the JPEG re-encode augmentation when training, ImageNet
normalisation; the CE view (each image squashed to one tile) for samples the use_comp rule
selects; ChatML + ``<image>`` expansion + ``<COMP_CONTEXT>`` slots via
:func:`emit_jax.data.tokenizer.encode_chat`.

Batches (:func:`collate`) pad token sequences to the smallest of ``length_buckets`` that fits
(right padding for the loss path, left padding for generation) and the tile stack to a multiple
of ``tile_bucket``, so the jitted step sees few distinct shapes. :func:`make_dataset` shuffles
with a seed, shards by process (``process_index::process_count``) for multihost runs, and
returns a grain iterator whose ``get_state()`` / ``set_state()`` go into checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from emit_jax.data.image import load_image, load_image_bytes, preprocess, to_tile
from emit_jax.errors import ConfigError
from emit_jax.data.comp import use_comp

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    image_size: int = 448
    max_tiles: int = 6
    tokens_per_tile: int = 256
    train: bool = True  # JPEG augmentation + the training newline quirk
    comp_slots: int = 0  # 9 + CE tokens for an EMIT model; 0 for a plain InternVL
    comp_token_id: int | None = None
    with_answer: bool = True  # stage 1: the assistant letter is the label; stage 2: prompt only
    length_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    tile_bucket: int = 4
    ce_bucket: int = 1  # CE rows padded to a multiple of this (fixed shapes for the sampler)
    pad_side: str = "right"  # "left" for generation

    @classmethod
    def for_model(cls, model, **kw) -> "PipelineConfig":
        """The encoding ``model`` (an InternVL, or an EMIT model with its ``<COMP_CONTEXT>``
        slots) takes: its image size, tokens per tile and comp slots; ``kw`` sets the rest."""
        mcfg, ecfg = model.config, getattr(model, "emit_config", None)
        return cls(image_size=mcfg.vision.image_size, tokens_per_tile=mcfg.tokens_per_tile,
                   comp_slots=model.num_comp_slots if ecfg is not None else 0,
                   comp_token_id=ecfg.comp_token_id if ecfg is not None else None, **kw)


class RecordEncoder:
    """JSONL record -> dict of numpy arrays (+ the fields rewards need)."""

    def __init__(self, tokenizer, cfg: PipelineConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        from emit_jax.data.tokenizer import encode_chat

        cfg = self.cfg
        user = record["messages"][0]["content"]
        if "image_bytes" in record:  # from a tfds data source (emit_jax.data.tfds_builders)
            images = [load_image_bytes(b, f"{record.get('id', '?')}[{k}]")
                      for k, b in enumerate(record["image_bytes"])]
        else:
            images = [load_image(p) for p in record.get("images", [])]
        tiles = [preprocess(im, cfg.image_size, cfg.max_tiles, train=cfg.train, rng=rng)
                 for im in images]
        comp = cfg.comp_slots > 0 and use_comp(len(images), user, mode="train")
        answer = None
        if cfg.with_answer and len(record["messages"]) > 1:
            answer = record["messages"][1]["content"]
        enc = encode_chat(self.tokenizer, user, tiles_per_image=[len(t) for t in tiles],
                          tokens_per_tile=cfg.tokens_per_tile, assistant=answer,
                          mode="train" if cfg.train else "eval",
                          comp_slots=cfg.comp_slots if comp else 0,
                          comp_token_id=cfg.comp_token_id)
        pix = np.concatenate(tiles) if tiles else \
            np.zeros((0, 3, cfg.image_size, cfg.image_size), np.float32)
        out = {"input_ids": np.asarray(enc["input_ids"], np.int32),
               "labels": np.asarray(enc["labels"], np.int32),
               "pixel_values": pix.astype(np.float32),
               "use_comp": bool(comp),
               "solution": record.get("solution") or answer or "",
               "task_type": record.get("task_type") or "",
               "id": str(record.get("id", ""))}
        if comp:
            out["ce_pixels"] = np.stack([to_tile(images[0], cfg.image_size),
                                         to_tile(images[1], cfg.image_size)]).astype(np.float32)
        return out


def bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ConfigError(f"config data.length_buckets: a sequence of {n} tokens exceeds the "
                      f"largest length bucket {buckets[-1]}; add a bucket of at least {n}")


def collate(examples: Sequence[dict], cfg: PipelineConfig, pad_id: int = 0) -> dict[str, Any]:
    """Pad a list of encoded examples into one batch.

    input_ids / labels / attention_mask ``[B, L]`` (L a length bucket); pixel_values
    ``[N, 3, S, S]`` with N the tile count rounded up to ``tile_bucket`` (``num_tiles`` real);
    ce_pixels ``[M, 2, 3, S, S]`` for the CE samples in batch order (``num_ce`` real, the rows
    ``use_comp [B]`` marks); ``row_tiles [B]`` each row's tile count (micro-batch splitting).
    """
    b = len(examples)
    L = bucket(max(len(e["input_ids"]) for e in examples), cfg.length_buckets)
    ids = np.full((b, L), pad_id, np.int32)
    labels = np.full((b, L), IGNORE, np.int32)
    mask = np.zeros((b, L), np.int32)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        sl = slice(0, n) if cfg.pad_side == "right" else slice(L - n, L)
        ids[i, sl] = e["input_ids"]
        labels[i, sl] = e["labels"]
        mask[i, sl] = 1
    s = cfg.image_size
    tiles = [e["pixel_values"] for e in examples if len(e["pixel_values"])]
    n_tiles = sum(len(t) for t in tiles)
    n_pad = max(cfg.tile_bucket, -(-n_tiles // cfg.tile_bucket) * cfg.tile_bucket)
    pix = np.zeros((n_pad, 3, s, s), np.float32)
    if tiles:
        pix[:n_tiles] = np.concatenate(tiles)
    ce = [e["ce_pixels"] for e in examples if e.get("use_comp")]
    m_pad = max(cfg.ce_bucket, -(-len(ce) // cfg.ce_bucket) * cfg.ce_bucket, 1)
    ce_pix = np.zeros((m_pad, 2, 3, s, s), np.float32)
    if ce:
        ce_pix[:len(ce)] = np.stack(ce)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pix,
            "num_tiles": np.int32(n_tiles), "ce_pixels": ce_pix, "num_ce": np.int32(len(ce)),
            "use_comp": np.array([bool(e.get("use_comp")) for e in examples]),
            "row_tiles": np.array([len(e["pixel_values"]) for e in examples], np.int32),
            "solution": [e["solution"] for e in examples],
            "task_type": [e["task_type"] for e in examples], "id": [e["id"] for e in examples]}


def repeat_rows(batch: dict, times: int) -> dict:
    """A collated ``batch`` of B rows as the batch of ``B x times`` rows that :func:`collate`
    makes of each example repeated ``times`` times in a row (row ``i`` -> rows ``i * times ..
    i * times + times - 1``): GRPO's G completions of one prompt see the same prompt, tiles and
    CE pair. The tile and CE stacks are padded to ``times`` x their own padded length, the
    bucket a collation of all ``B x times`` rows with ``tile_bucket`` / ``ce_bucket`` scaled by
    ``times`` gives."""
    if times == 1:
        return dict(batch)
    rep = {k: np.repeat(batch[k], times, axis=0)
           for k in ("input_ids", "labels", "attention_mask", "use_comp", "row_tiles")}
    starts = np.concatenate([[0], np.cumsum(batch["row_tiles"])])
    pix = batch["pixel_values"]
    order = [t for i in range(len(batch["row_tiles"])) for _ in range(times)
             for t in range(starts[i], starts[i + 1])]
    n_tiles = len(order)
    out_pix = np.zeros((len(pix) * times,) + pix.shape[1:], pix.dtype)
    out_pix[:n_tiles] = pix[order]
    ce, n_ce = batch["ce_pixels"], int(batch["num_ce"])
    out_ce = np.zeros((len(ce) * times,) + ce.shape[1:], ce.dtype)
    out_ce[:n_ce * times] = np.repeat(ce[:n_ce], times, axis=0)
    lists = {k: [v for v in batch[k] for _ in range(times)]
             for k in ("solution", "task_type", "id") if k in batch}
    return {**batch, **rep, **lists, "pixel_values": out_pix, "num_tiles": np.int32(n_tiles),
            "ce_pixels": out_ce, "num_ce": np.int32(n_ce * times)}


class _Encode(grain.transforms.RandomMap):
    def __init__(self, encoder: RecordEncoder):
        self.encoder = encoder

    def random_map(self, record, rng: np.random.Generator):
        return self.encoder(record, rng)


def make_dataset(records: Sequence[dict], tokenizer, cfg: PipelineConfig, *, batch_size: int,
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1, drop_remainder: bool = True,
                 pad_id: int = 0) -> grain.IterDataset:
    """A grain dataset of batches. Each process sees ``records[process_index::process_count]``
    of every (seeded) shuffle, so step ``s`` of ``P`` processes with ``batch_size`` b covers the
    same records as step ``s`` of one process with batch ``P * b``; iterate with ``iter(ds)`` and
    checkpoint the iterator's ``get_state()``."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    ds = grain.MapDataset.source(records)  # any random-access sequence (a list, a tfds source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    # the augmentation's randomness follows the element's global index (encoding is lazy, so
    # each process still encodes only its own elements): any process count sees the same samples
    ds = ds.random_map(_Encode(RecordEncoder(tokenizer, cfg)), seed=seed)
    ds = ds[process_index::process_count]
    it = ds.to_iter_dataset()
    return it.batch(batch_size, drop_remainder=drop_remainder,
                    batch_fn=lambda exs: collate(exs, cfg, pad_id))


def label_positions(labels: np.ndarray, min_k: int = 8) -> dict[str, np.ndarray]:
    """Where the loss is: ``labels [B, T]`` (IGNORE elsewhere) -> ``label_pos [B, K]`` (the
    positions whose next token is a label), ``label_ids [B, K]`` (that token) and ``label_mask
    [B, K]``. K is the largest per-row count rounded up to a power of two (at least ``min_k``), so
    a few shapes cover a run. The vocabulary projection then runs on K positions per row instead
    of T: the [B, T, V] logits are never built (V is 151,674 for InternVL3)."""
    labels = np.asarray(labels)
    nxt = labels[:, 1:] != IGNORE
    k = max(min_k, 1 << int(max(1, nxt.sum(1).max(initial=1)) - 1).bit_length())
    B = labels.shape[0]
    pos = np.zeros((B, k), np.int32)
    ids = np.zeros((B, k), np.int32)
    msk = np.zeros((B, k), bool)
    for i in range(B):
        where = np.flatnonzero(nxt[i])
        pos[i, :len(where)] = where
        ids[i, :len(where)] = labels[i, where + 1]
        msk[i, :len(where)] = True
    return {"label_pos": pos, "label_ids": ids, "label_mask": msk}


def batch_ce(batch: dict):
    """(``ce_pixels [n, 2, 3, H, W]`` of the collated ``batch``'s ``n`` CE pairs as a device
    array, or None when it has none; ``n``)."""
    import jax.numpy as jnp  # noqa: PLC0415 - the pipeline itself is host-side numpy

    n = int(batch["num_ce"])
    return (jnp.asarray(batch["ce_pixels"][:n]) if n else None), n
