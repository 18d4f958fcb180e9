"""Kernel switches of the model: which attention implementation runs, and how the decode loop
attends to its KV cache. Read at trace time from a context (``kernel_options``), like
``emit_jax.models.memory``; the trainer sets them from ``cfg.kernels`` for the whole run.

``attention`` (the LLM's full-sequence attention — training, scoring, prefill — and the ViT's):

- ``"einsum"``: two einsums and a float32 softmax over a dense ``[B, T, S]`` mask (the default;
  on a CPU nothing is faster, and it is the reference the others are tested against);
- ``"dot_product"``: ``jax.nn.dot_product_attention``: cuDNN's fused flash attention on a GPU
  (bf16/fp16 models; left padding is rolled to the right padding cuDNN assumes, with per-row
  sequence lengths), XLA's implementation elsewhere (and for float32 models on a GPU);
- ``"splash"``: Pallas splash attention for TPUs (``jax.experimental.pallas.ops.tpu``): padding
  as segment ids, sequences padded to whole blocks, under ``shard_map`` on a mesh. Off a TPU it
  runs in Pallas interpret mode (slow; for numerics checks only);
- ``"auto"``: ``splash`` on a TPU, ``dot_product`` on a GPU, ``einsum`` on a CPU (the platform
  the traced program is for, :func:`platform`: an ahead-of-time compile for a TPU slice on a
  CPU host counts as a TPU).

``decode``: how a decode step attends to the cache:

- ``"full"``: over every slot of the cache (prompt + ``max_new_tokens``), filled or not;
- ``"bucketed"``: the sampler's decode loop runs in phases whose attention reads only the slots
  filled so far, rounded up to a bucket (``decode_bucket`` new tokens, doubling per phase), so a
  step's attention costs the filled length, not the cache's. Same tokens.

Values and gradients of every choice equal ``einsum`` (float32, 1e-5; ``tests/test_kernels.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax

from emit_jax.errors import ConfigError
from emit_jax.limits import MAX_TOKENS

from emit_jax.parallel import active_mesh

ATTENTION = ("einsum", "dot_product", "splash", "auto")
DECODE = ("full", "bucketed")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    attention: str = "einsum"
    decode: str = "full"
    decode_bucket: int = 64

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ConfigError(f"kernels.attention must be one of {', '.join(ATTENTION)}, "
                              f"got {self.attention!r}")
        if self.decode not in DECODE:
            raise ConfigError(f"kernels.decode must be one of {', '.join(DECODE)}, "
                              f"got {self.decode!r}")
        if not 1 <= int(self.decode_bucket) <= MAX_TOKENS:
            raise ConfigError(f"kernels.decode_bucket must be in [1, {MAX_TOKENS}], got "
                              f"{self.decode_bucket}")

    def attention_impl(self) -> str:
        """The implementation ``attention`` resolves to on the current backend."""
        if self.attention != "auto":
            return self.attention
        return {"tpu": "splash", "gpu": "dot_product"}.get(platform(), "einsum")


def platform() -> str:
    """The platform a program traced now will run on: the devices of the enclosing mesh
    (``emit_jax.parallel.use_mesh``; abstract TPU devices when ``python -m emit_jax.aot``
    compiles for a slice on a CPU host), else ``jax.default_backend()``."""
    active = active_mesh()
    if active is not None:
        return active[0].devices.flat[0].platform
    return jax.default_backend()


_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("emit_jax_kernels",
                                                          default=KernelOptions())


def current() -> KernelOptions:
    return _OPTIONS.get()


@contextlib.contextmanager
def applied(options: KernelOptions):
    """``with applied(opts): ...``: trace the code inside under ``opts``."""
    token = _OPTIONS.set(options)
    try:
        yield options
    finally:
        _OPTIONS.reset(token)


def kernel_options(attention: str = "einsum", decode: str = "full", decode_bucket: int = 64,
                   **ignored):
    """``with kernel_options(attention="splash"): ...`` (traced code inside). Keys of
    ``cfg.kernels`` that are not trace-time switches (``scan_layers``) are ignored here.
    A program jitted once keeps the options it was traced with unless they are part of its
    cache key (the sampler passes :func:`current` as a static argument)."""
    del ignored
    return applied(KernelOptions(str(attention), str(decode), int(decode_bucket)))
