"""Supervised fine-tuning: the base-model stage and EMIT's stage 1.

Loss: token cross-entropy over the label positions (the answer and the closing ``<|im_end|>``),
mean over all label tokens of the batch (PyTorch ``CrossEntropyLoss`` with ignore index -100).
Only parameters matching ``wrt`` are differentiated and updated (stage 1: soft prompt and
projector; the MLLM frozen).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from emit_jax import faults
from emit_jax.data.pipeline import IGNORE, PipelineConfig, make_dataset
from emit_jax.training import micro, nonfinite, precision, preemption
from emit_jax.training.metrics import MetricWriter
from emit_jax.training.nonfinite import NonFiniteCounter, NonFiniteError
from emit_jax.training.state import StageCheckpoints

ARRAY_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "tile_valid", "ce_pixels",
              "num_ce", "label_pos", "label_ids", "label_mask")


@dataclasses.dataclass
class OptimConfig:
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 1e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # rows per micro-batch (gradient accumulation, emit_jax.training.micro); 0 = the whole batch
    micro_batch_size: int = 0


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay to 0, global-norm clipping. The first moment
    is kept in float32 (``mu_dtype``), the second follows the parameter, which is float32 for
    every trained parameter (``emit_jax.training.precision``)."""
    warm = max(0, int(round(cfg.warmup_ratio * cfg.steps)))
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warm, 1), max(cfg.steps, warm + 1), 0.0) \
        if warm else optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1))
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay, mu_dtype=jnp.float32))


def make_train_state(model, ocfg: OptimConfig, wrt) -> nnx.Optimizer:
    """The optimizer of a stage that trains ``wrt`` of ``model``, after storing those parameters
    in float32 (``precision.promote_trainable``: a bf16 model keeps bf16 frozen weights and
    compute, with float32 master weights and AdamW state for what it trains)."""
    n = precision.promote_trainable(model, wrt)
    if n:
        print(f"[precision] {n} trained arrays stored in float32 (frozen weights and compute "
              f"keep their dtypes)", file=sys.stderr, flush=True)
    return nnx.Optimizer(model, make_optimizer(ocfg), wrt=wrt)


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
    if hasattr(model, "emit_config"):
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
    from emit_jax.parallel import assemble_batch

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
    ``emit_jax.training.nonfinite``): one jitted program; over ``mesh`` with the parameters and
    optimizer state sharded by their logical axes and the batch over data x fsdp
    (``emit_jax.parallel.sharded_jit``). With ``micro_batches`` M > 1, ``b`` is the step's batch
    in M micro-batches (``micro.split_rows``: arrays ``[N / M, M, ...]``) and the gradient is
    accumulated over them (``emit_jax.training.micro``): same loss and update, one micro-batch's
    activations at a time."""
    from emit_jax.parallel import sharded_jit

    mutable = nnx.Any(wrt, nnx.Not(nnx.Param))

    def step(model, optimizer, b):
        before = nonfinite.snapshot((model, optimizer), mutable)
        if micro_batches > 1:
            total = jnp.maximum(jnp.sum(b["label_mask"]), 1).astype(jnp.float32)
            loss, (n, correct), grads = micro.accumulate(
                model, wrt, b, lambda m, mb: sft_loss(m, mb, denominator=total))
            n, correct = jnp.sum(n), jnp.sum(correct)
        else:
            grad_fn = nnx.value_and_grad(sft_loss, argnums=nnx.DiffState(0, wrt), has_aux=True)
            (loss, (n, correct)), grads = grad_fn(model, b)
        ok = nonfinite.update_if_finite(model, optimizer, grads, loss, mutable, before)
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


def run_sft(model, records, tokenizer, pcfg: PipelineConfig, ocfg: OptimConfig, stage_dir: str, *,
            wrt=nnx.Param, name: str = "sft", seed: int = 0, checkpoint_every: int = 50,
            log_every: int = 5, pad_id: int = 0, mesh=None,
            on_nonfinite: str = "skip") -> dict[str, Any]:
    """Train ``model`` in place for ``ocfg.steps`` steps (resuming from ``stage_dir``). With
    ``mesh`` (``emit_jax.parallel.make_mesh``) the model and optimizer state are sharded by
    their logical axes and each step runs as one program over the mesh. With several processes
    each reads only the rows of the batch its devices hold (``parallel.process_rows``) and the
    global batch is assembled from the pieces (``parallel.assemble_batch``).

    Interruptions: SIGTERM / SIGINT stop after the current step with that step saved
    (``emit_jax.training.preemption``); a step with a non-finite loss or gradient changes
    nothing and is counted, ``on_nonfinite`` = ``"skip"`` goes on, ``"stop"`` stops with the last
    good state saved (``emit_jax.training.nonfinite``)."""
    if not records:
        raise ValueError(f"{name}: no training records")
    model.train()
    optimizer = make_train_state(model, ocfg, wrt)
    if mesh is not None:
        from emit_jax.parallel import shard_module

        shard_module((model, optimizer), mesh)  # before restore: Orbax restores into these
    ckpt = StageCheckpoints(os.path.join(stage_dir, "ckpt"), every=checkpoint_every, name=name)
    batch_size, device_batch = ocfg.batch_size, to_device
    n_micro = micro.micro_count(ocfg.batch_size, ocfg.micro_batch_size, f"{name}.batch_size")
    if n_micro > 1:
        device_batch = functools.partial(micro_device_batch, m=n_micro)
        print(f"[{name}] {n_micro} micro-batches of {ocfg.batch_size // n_micro} rows per step "
              f"(gradient accumulation)", file=sys.stderr, flush=True)
    process_index, process_count, rows = 0, 1, None
    if mesh is not None:
        from emit_jax.parallel import process_rows

        rows = process_rows(ocfg.batch_size, mesh)
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
    it = iter(ds)
    start = 0
    meta = ckpt.restore(model, optimizer)
    if meta is not None:
        start = int(meta["step"])
        it.set_state(_data_state(meta, process_count))
    step_fn = make_train_step(wrt, mesh, micro_batches=n_micro)
    progress = MetricWriter(stage_dir, stage=name, total_steps=ocfg.steps, start_step=start)
    counter = NonFiniteCounter(name, on_nonfinite, skipped=(meta or {}).get("nonfinite_skipped", 0))
    history = []
    loss_acc = n_acc = c_acc = tok_acc = good = 0.0
    done, data_state = start, it.get_state()

    def meta_at(step):
        return {"step": step, "data": data_state, "data_processes": process_count,
                "nonfinite_skipped": counter.skipped}
    try:
        with preemption.guard():
            for step in range(start + 1, ocfg.steps + 1):
                batch = next(it)
                if faults.fires("nan", name, step):
                    batch = _poisoned(batch)
                loss, n, correct, ok = step_fn(model, optimizer, device_batch(batch))
                if counter.record(step, bool(ok)):  # raises when the policy says stop
                    loss_acc += float(loss)
                    n_acc += float(n)
                    c_acc += float(correct)
                    good += 1
                tok_acc += float(batch["attention_mask"].sum()) * process_count
                if step % log_every == 0 or step == ocfg.steps:
                    metrics = {"loss": loss_acc / good if good else float("nan"),
                               "label_acc": c_acc / max(n_acc, 1),
                               "nonfinite_skipped": counter.skipped}
                    progress.write(step, metrics, tokens=int(tok_acc))
                    tok_acc = 0.0
                    history.append({"step": step, **metrics})
                    loss_acc = n_acc = c_acc = good = 0.0
                done, data_state = step, it.get_state()
                ckpt.save(step, model, optimizer, meta_at(step), force=step == ocfg.steps)
                if preemption.stop_requested():
                    raise preemption.Preempted(f"{name}: stopped after step {step}")
    except (KeyboardInterrupt, NonFiniteError):  # a signal, or the non-finite policy: save the
        progress.close()                          # last finished (good) step, then stop
        ckpt.save_interrupted(done, start, model, optimizer, meta_at(done))
        raise
    ckpt.close()
    progress.close()
    model.eval()
    return {"steps": ocfg.steps, "history": history}
