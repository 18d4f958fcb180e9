"""Memory switches of the model's training forward: layer rematerialisation and query-chunked
attention. Read at trace time from a context (``memory_options``), so the same modules serve
a laptop run (both off, the fastest) and InternVL3-8B (both on, see ``python -m emit_jax.plan``).

- ``remat``: every Qwen2 decoder layer and InternViT layer runs under ``nnx.remat`` when there is
  no KV cache (training, scoring): the backward pass keeps what ``remat_policy`` saves and
  recomputes the rest of the layer.
- ``remat_policy`` (with ``remat``; names after MaxText's ``remat_policy``):

  - ``"full"``: keep only each layer's input, recompute the whole layer (the least memory);
  - ``"minimal"``: also keep the output of every weight matmul (dots without batch dimensions:
    the q/k/v/o projections and the MLP's three); the backward pass recomputes norms,
    activations and the attention scores only;
  - ``"save_dot_except_mlp"``: keep the attention projections' outputs (``qkv_proj``,
    ``out_proj``), recompute the MLP, whose ``[B, T, F]`` activations are the costly ones;
  - ``"save_qkv_proj"``: keep the q/k/v projections' outputs only.

  Those names are given by :class:`emit_jax.models.layers.Linear` from its kernel's logical
  axes (:func:`emit_jax.models.layers.remat_name`), for the LLM and the ViT alike.
- ``attention_chunk`` = C > 0: LLM attention runs over chunks of C queries (``lax.map`` of a
  ``jax.checkpoint``-ed chunk), so the float32 scores exist for one ``[B, heads, C, S]`` chunk
  at a time, forward and backward. Results equal the unchunked attention (rows are independent).
- ``vit_chunk`` = K > 0: the InternViT runs over its image tiles K at a time (``lax.map`` of a
  ``jax.checkpoint``-ed chunk), so one layer's working set (the ``[K, heads, 1025, 1025]``
  scores) and, in training, the recomputed residuals exist for K tiles, not for all tiles of the
  step: a GRPO step of InternVL3-8B has 64 prompts x 2 images x up to 7 tiles. Same values.

The trainer sets them from ``cfg.memory`` for the whole run; programs already compiled keep the
options they were traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax

from emit_jax.errors import ConfigError

#: ``remat_policy`` values (module docstring)
REMAT_POLICIES = ("full", "minimal", "save_dot_except_mlp", "save_qkv_proj")
_SAVED_NAMES = {"save_dot_except_mlp": ("qkv_proj", "out_proj"), "save_qkv_proj": ("qkv_proj",)}


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    remat: bool = False
    attention_chunk: int = 0
    vit_chunk: int = 0
    remat_policy: str = "full"

    def __post_init__(self):
        if int(self.attention_chunk) < 0:
            raise ConfigError(f"memory.attention_chunk must be >= 0, got "
                              f"{self.attention_chunk}")
        if int(self.vit_chunk) < 0:
            raise ConfigError(f"memory.vit_chunk must be >= 0, got {self.vit_chunk}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"memory.remat_policy must be one of "
                              f"{', '.join(REMAT_POLICIES)}, got {self.remat_policy!r}")

    def checkpoint_policy(self):
        """The ``jax.checkpoint`` policy of ``remat_policy`` (None: save nothing)."""
        names = _SAVED_NAMES.get(self.remat_policy)
        if names:
            return jax.checkpoint_policies.save_only_these_names(*names)
        if self.remat_policy == "minimal":
            return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        return None


_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("emit_jax_memory", default=MemoryOptions())


def current() -> MemoryOptions:
    return _OPTIONS.get()


@contextlib.contextmanager
def memory_options(remat: bool = False, attention_chunk: int = 0, vit_chunk: int = 0,
                   remat_policy: str = "full"):
    """``with memory_options(remat=True, attention_chunk=1024): ...`` (traced code inside)."""
    token = _OPTIONS.set(MemoryOptions(bool(remat), int(attention_chunk), int(vit_chunk),
                                       str(remat_policy)))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)
