"""Checkpoints of a training stage (Orbax ``CheckpointManager``).

A stage directory holds ``ckpt/<step>/`` with the trainable model state and optimizer state
(``state``), the grain iterator state and counters (``meta``, JSON). Running the same command
again restores the latest complete step and continues from it. Both are written in the unrolled
per-layer layout whatever ``scan_layers`` is (``emit_jax.models.scan``), so a run may resume
with the other setting.

Orbax writes a step into a temporary directory and renames it when complete, so a write cut
short (a kill, a full disk) is never taken for a checkpoint. A latest step that is there but
cannot be read (a truncated file) is moved aside to ``ckpt-unreadable/<step>`` with a warning
and the previous step is used instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp
from flax import nnx

from emit_jax import faults
from emit_jax.models import scan


class StageCheckpoints:
    def __init__(self, directory: str, *, every: int, keep: int = 2, async_save: bool = True,
                 state_filter=..., name: str = ""):
        """``state_filter``: which model variables are saved (default all; GRPO saves only the
        trainable ones: LoRA factors, the fully trained modules, BatchNorm statistics).
        ``name``: the stage, for messages and ``emit_jax.faults``."""
        self.filter = state_filter
        self.directory, self.name = os.path.abspath(directory), name
        os.makedirs(directory, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(1, every),
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                                             item_names=("state", "meta"))

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, optimizer, meta: dict, *, force: bool = False) -> bool:
        state = scan.unstack_layers(self._pure(model, optimizer))
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        if saved and faults.fires("kill_in_save", self.name, step):
            faults.kill_now()  # the reliability tests: a kill while this step is being written
        return saved

    def save_interrupted(self, step: int, start: int, model, optimizer, meta: dict) -> None:
        """On SIGTERM / Ctrl-C: save the last finished ``step`` unless it is saved already (or
        nothing ran since ``start``), then wait for the write and close."""
        if step > start and self.latest_step != step:
            self.save(step, model, optimizer, meta, force=True)
        self.close()

    def restore(self, model, optimizer, step: int | None = None) -> dict | None:
        """Restore the latest readable step (or ``step``) into ``model`` / ``optimizer`` in place;
        returns the saved meta (or None when there is no checkpoint). An unreadable latest step
        is moved aside with a warning and the one before it is tried."""
        if step is not None:
            return self._restore(model, optimizer, step)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._restore(model, optimizer, step)
            except Exception as e:  # noqa: BLE001 - any unreadable file: fall back, keep it
                self._set_aside(step, e)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        aside = os.path.join(os.path.dirname(self.directory),
                             os.path.basename(self.directory) + "-unreadable")
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            target = os.path.join(aside, f"{step}-{int(time.time())}")
            shutil.move(os.path.join(self.directory, str(step)), target)
            from emit_jax.errors import message

            print(f"warning: {self.name or 'stage'} checkpoint step {step} is unreadable "
                  f"({type(error).__name__}: {message(error)[:200]}); moved to {target}, trying "
                  f"the previous step", file=sys.stderr, flush=True)
        from emit_jax.parallel import barrier

        barrier(f"ckpt-aside:{self.directory}:{step}")
        self.manager.reload()

    def _restore(self, model, optimizer, step: int) -> dict:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._pure(model, optimizer))
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(scan.unstack_layers(abstract, scan.layer_struct)),
            meta=ocp.args.JsonRestore()))
        restored = scan.stack_layers(out["state"], abstract)
        ms, os_ = nnx.state(model, self.filter), nnx.state(optimizer)
        nnx.replace_by_pure_dict(ms, restored["model"])
        nnx.replace_by_pure_dict(os_, restored["opt"])
        nnx.update(model, ms)
        nnx.update(optimizer, os_)
        return dict(out["meta"])

    def _pure(self, model, optimizer) -> dict:
        return {"model": nnx.to_pure_dict(nnx.state(model, self.filter)),
                "opt": nnx.to_pure_dict(nnx.state(optimizer))}

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
