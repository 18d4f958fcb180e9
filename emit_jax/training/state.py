"""Checkpoints of a training stage (Orbax ``CheckpointManager``).

A stage directory holds ``ckpt/<step>/`` with the trainable model state and optimizer state
(``state``), the grain iterator state and counters (``meta``, JSON). Running the same command
again restores the latest complete step and continues from it.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


class StageCheckpoints:
    def __init__(self, directory: str, *, every: int, keep: int = 2, async_save: bool = True,
                 state_filter=...):
        """``state_filter``: which model variables are saved (default all; GRPO saves only the
        trainable ones: LoRA factors, the fully trained modules, BatchNorm statistics)."""
        self.filter = state_filter
        os.makedirs(directory, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(1, every),
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                                             item_names=("state", "meta"))

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, optimizer, meta: dict, *, force: bool = False) -> bool:
        state = {"model": nnx.to_pure_dict(nnx.state(model, self.filter)),
                 "opt": nnx.to_pure_dict(nnx.state(optimizer))}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def save_interrupted(self, step: int, start: int, model, optimizer, meta: dict) -> None:
        """On SIGTERM / Ctrl-C: save the last finished ``step`` unless it is saved already (or
        nothing ran since ``start``), then wait for the write and close."""
        if step > start and self.latest_step != step:
            self.save(step, model, optimizer, meta, force=True)
        self.close()

    def restore(self, model, optimizer, step: int | None = None) -> dict | None:
        """Restore into ``model`` / ``optimizer`` in place; returns the saved meta (or None)."""
        step = self.latest_step if step is None else step
        if step is None:
            return None
        target = {"model": nnx.to_pure_dict(nnx.state(model, self.filter)),
                  "opt": nnx.to_pure_dict(nnx.state(optimizer))}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        ms, os_ = nnx.state(model, self.filter), nnx.state(optimizer)
        nnx.replace_by_pure_dict(ms, out["state"]["model"])
        nnx.replace_by_pure_dict(os_, out["state"]["opt"])
        nnx.update(model, ms)
        nnx.update(optimizer, os_)
        return dict(out["meta"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
