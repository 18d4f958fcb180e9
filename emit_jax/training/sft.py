"""Supervised fine-tuning: the base-model stage and EMIT's stage 1.

Loss: token cross-entropy over the label positions (the answer and the closing ``<|im_end|>``),
mean over all label tokens of the batch (PyTorch ``CrossEntropyLoss`` with ignore index -100).
Only parameters matching ``wrt`` are differentiated and updated (stage 1: soft prompt and
projector; the MLLM frozen).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emit_jax import faults
from emit_jax.errors import DataError
from emit_jax.data.pipeline import IGNORE, PipelineConfig, label_positions, make_dataset
from emit_jax.parallel import assemble_batch, process_rows, shard_module, sharded_jit
from emit_jax.training import micro, optim
from emit_jax.training.config import OptimConfig
from emit_jax.training.loop import Stage, StepResult, run_loop
from emit_jax.training.state import StageCheckpoints
from emit_jax.models.emit import is_emit

ARRAY_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "tile_valid", "ce_pixels",
              "num_ce", "label_pos", "label_ids", "label_mask")


def to_device(batch: dict) -> dict:
    """The model inputs of a collated batch (plus :func:`label_positions`); a text-only batch
    (no tiles) carries no pixels."""
    if "labels" in batch and "label_pos" not in batch:
        batch = {**batch, **label_positions(batch["labels"])}
    out = {k: jnp.asarray(batch[k]) for k in ARRAY_KEYS if k in batch}
    if "num_tiles" in batch and int(batch["num_tiles"]) == 0:
        out.pop("pixel_values", None)
    return out


def _forward(model, b: dict, compute_logits: bool):
    kw = {"tile_valid": b["tile_valid"]} if "tile_valid" in b else {}
    if is_emit(model):
        kw.update(ce_pixels=b["ce_pixels"], num_ce=b["num_ce"])
    return model.forward(b["input_ids"], b.get("pixel_values"), b["attention_mask"],
                         compute_logits=compute_logits, **kw)


def forward_logits(model, b: dict) -> jax.Array:
    """``[B, T, V]`` logits of every position."""
    return _forward(model, b, True).logits


def _nll(logits, targets, mask, denominator=None):
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (logz - gold) * mask
    n = jnp.maximum(jnp.sum(mask), 1) if denominator is None else denominator
    # the gold token is the argmax when its logit reaches the row's maximum (a max-reduce XLA
    # shares with logsumexp's; jnp.argmax's index-carrying reduce over the vocabulary was a
    # single-threaded ~150 ms of a 2.5 s `small` train step; ties count as correct)
    correct = jnp.sum((gold >= jnp.max(logits, axis=-1)) & mask)
    return jnp.sum(nll) / n, (jnp.sum(mask), correct)


def sft_loss(model, b: dict, denominator=None):
    """(mean label-token NLL, (label tokens, correct argmax tokens)).

    With ``label_pos``/``label_ids``/``label_mask`` in ``b`` (:func:`to_device` adds them) only
    the label positions go through the vocabulary projection; without them, all positions do
    (same value). ``denominator``: divide the summed NLL by this (the whole step's label tokens
    when ``b`` is one micro-batch of it) instead of ``b``'s own label tokens."""
    if "label_pos" in b:
        hidden = _forward(model, b, False).last_hidden  # [B, T, D]
        h = jnp.take_along_axis(hidden, b["label_pos"][..., None], axis=1)  # [B, K, D]
        logits = model.logits_from_hidden(h).astype(jnp.float32)
        return _nll(logits, b["label_ids"], b["label_mask"], denominator)
    logits = forward_logits(model, b)[:, :-1].astype(jnp.float32)
    targets = b["labels"][:, 1:]
    mask = targets != IGNORE
    return _nll(logits, jnp.where(mask, targets, 0), mask, denominator)


def _poisoned(batch: dict) -> dict:
    """``emit_jax.faults`` ``nan``: the batch's pixel tiles and CE pairs become NaN."""
    return {**batch, **{k: batch[k] * np.float32("nan") for k in ("pixel_values", "ce_pixels")
                        if k in batch}}


def _assemble(batch: dict, **kw) -> dict:
    return assemble_batch({**batch, **label_positions(batch["labels"])}, **kw)


def _data_state(meta: dict, process_count: int) -> dict:
    """The saved grain iterator state for this run's process count. Every process's iterator
    stands at the same local index (full batches, records dealt round-robin), so a state saved
    by ``P`` processes continues with ``Q`` at ``index * P / Q``."""
    state = dict(meta["data"])
    saved = int(meta.get("data_processes", 1))
    if saved != process_count and "next_index" in state:
        total = int(state["next_index"]) * saved
        if total % process_count:
            raise ValueError(f"the checkpoint's data position ({total} records over {saved} "
                             f"process(es)) does not split over {process_count} processes")
        state["next_index"] = total // process_count
    return state


def make_train_step(wrt, mesh=None, rules=None, micro_batches: int = 1):
    """``step(model, optimizer, b) -> (loss, label tokens, correct tokens, finite)``, updating
    both in place unless the loss or a gradient is non-finite (then nothing changes,
    ``emit_jax.training.optim``): one jitted program; over ``mesh`` with the parameters and
    optimizer state sharded by their logical axes and the batch over data x fsdp
    (``emit_jax.parallel.sharded_jit``). With ``micro_batches`` M > 1, ``b`` is the step's batch
    in M micro-batches (``micro.split_rows``: arrays ``[N / M, M, ...]``) and the gradient is
    accumulated over them (``emit_jax.training.micro``): same loss and update, one micro-batch's
    activations at a time."""
    mutable = nnx.Any(wrt, nnx.Not(nnx.Param))

    def step(model, optimizer, b):
        before = optim.snapshot((model, optimizer), mutable)
        if micro_batches > 1:
            total = jnp.maximum(jnp.sum(b["label_mask"]), 1).astype(jnp.float32)
            loss, (n, correct), grads = micro.accumulate(
                model, wrt, b, lambda m, mb: sft_loss(m, mb, denominator=total))
            n, correct = jnp.sum(n), jnp.sum(correct)
        else:
            grad_fn = nnx.value_and_grad(sft_loss, argnums=nnx.DiffState(0, wrt), has_aux=True)
            (loss, (n, correct)), grads = grad_fn(model, b)
        ok = optim.update_if_finite(model, optimizer, grads, loss, mutable, before)
        return loss, n, correct, ok
    return sharded_jit(step, mesh, rules, mutable=mutable)


def micro_device_batch(batch: dict, m: int) -> dict:
    """A collated batch -> the model inputs of :func:`make_train_step` with ``m`` micro-batches
    (a text-only batch carries no pixels)."""
    parts = micro.split_rows(batch, m)
    out = {k: jnp.asarray(parts[k]) for k in ARRAY_KEYS if k in parts}
    if "num_tiles" in batch and int(batch["num_tiles"]) == 0:
        out.pop("pixel_values", None)
    return out


def _summarize(results, skipped: int) -> dict:
    """A log line: the mean loss of the finite steps since the last line, their label-token
    accuracy, and the non-finite steps skipped so far."""
    good = [r for r in results if r.finite]
    n = sum(r.scalars["n"] for r in good)
    return {"loss": sum(r.scalars["loss"] for r in good) / len(good) if good else float("nan"),
            "label_acc": sum(r.scalars["correct"] for r in good) / max(n, 1),
            "nonfinite_skipped": skipped}


def run_sft(model, records, tokenizer, pcfg: PipelineConfig, ocfg: OptimConfig, stage_dir: str, *,
            wrt=nnx.Param, name: str = "sft", seed: int = 0, checkpoint_every: int = 50,
            log_every: int = 5, pad_id: int = 0, mesh=None,
            on_nonfinite: str = "skip") -> dict[str, Any]:
    """Train ``model`` in place for ``ocfg.steps`` steps (resuming from ``stage_dir``) through
    :func:`emit_jax.training.loop.run_loop`. With ``mesh`` (``emit_jax.parallel.make_mesh``)
    the model and optimizer state are sharded by their logical axes and each step runs as one
    program over the mesh. With several processes each reads only the rows of the batch its
    devices hold (``parallel.process_rows``) and the global batch is assembled from the pieces
    (``parallel.assemble_batch``). ``on_nonfinite``: the loop's non-finite policy."""
    if not records:
        raise DataError(f"the {name} stage has no training records: the dataset gave none "
                        "for it (an empty train split? see data.source and its splits.json)")
    model.train()
    optimizer = optim.make_train_state(model, ocfg, wrt)
    if mesh is not None:
        shard_module((model, optimizer), mesh)  # before restore: Orbax restores into these
    ckpt = StageCheckpoints(os.path.join(stage_dir, "ckpt"), every=checkpoint_every, name=name)
    batch_size, device_batch = ocfg.batch_size, to_device
    n_micro = micro.micro_count(ocfg.batch_size, ocfg.micro_batch_size, f"{name}.batch_size")
    if n_micro > 1:
        device_batch = functools.partial(micro_device_batch, m=n_micro)
        print(f"[{name}] {n_micro} micro-batches of {ocfg.batch_size // n_micro} rows per step "
              f"(gradient accumulation)", file=sys.stderr, flush=True)
    process_index, process_count = 0, 1
    rows = process_rows(ocfg.batch_size, mesh) if mesh is not None else None
    if rows is not None and n_micro > 1:
        raise ValueError(f"{name}.micro_batch_size: gradient accumulation runs in one process "
                         f"(one host with its devices); this run has {jax.process_count()} "
                         f"processes: set it to 0 and scale the batch over hosts instead")
    if rows is not None:  # several processes, each holding its own rows: each loads just those
        process_index, process_count = jax.process_index(), jax.process_count()
        batch_size = rows[1] - rows[0]
        print(f"[{name}] process {process_index} loads rows {rows[0]}-{rows[1] - 1} of each "
              f"{ocfg.batch_size}-row batch", file=sys.stderr, flush=True)
        device_batch = functools.partial(_assemble, mesh=mesh, pad_id=pad_id,
                                         pad_side=pcfg.pad_side)
    ds = make_dataset(records, tokenizer, pcfg, batch_size=batch_size, seed=seed,
                      process_index=process_index, process_count=process_count, pad_id=pad_id)
    step_fn = make_train_step(wrt, mesh, micro_batches=n_micro)

    def step(n: int, batch: dict) -> StepResult:
        if faults.fires("nan", name, n):
            batch = _poisoned(batch)
        loss, n_tok, correct, ok = step_fn(model, optimizer, device_batch(batch))
        return StepResult(bool(ok), {"loss": float(loss), "n": float(n_tok),
                                     "correct": float(correct)},
                          tokens=int(float(batch["attention_mask"].sum()) * process_count))

    stage = Stage(name=name, steps=ocfg.steps, model=model, optimizer=optimizer, data=iter(ds),
                  step=step, summarize=_summarize, log_every=log_every,
                  data_state=lambda meta: _data_state(meta, process_count),
                  extra_meta=lambda: {"data_processes": process_count})
    history = run_loop(stage, ckpt, stage_dir, on_nonfinite=on_nonfinite)
    model.eval()
    return {"steps": ocfg.steps, "history": history}
