"""Starting a run's ViT from trained weights (``vision_init``) while the rest of the model starts
from random ones.

EMIT starts from an MLLM whose ViT already sees; the embedded default's tiny model has no such
checkpoint, and a random ViT's features make the contrastive heat map no better than raw
pixels (docs/training.md). ``vision_init`` names where the ViT's weights come from:

- ``""``: none (the random initialisation of ``seed``);
- ``"embedded"``: the ViT shipped with the package for architecture ``tiny``
  (``emit_jax/assets/``, :data:`PACKAGED`), trained without labels on the embedded default's
  stage-2 training images by ``python -m emit_jax.experiments.vit_pretrain`` and written by
  ``python -m emit_jax.experiments.vit_asset`` (the command and its settings are in the file's
  metadata: :func:`metadata`);
- a ``.safetensors`` file of a vision tower (``vit_asset``'s output), or a model folder (a
  ``vit_pretrain`` or stage checkpoint, or a Hugging Face folder): its ``vision_tower``.

The tensors are stored under transformers' keys and layouts (``emit_jax.hf.hf_key``), only the
``vision_tower.*`` ones. ``mlp1`` and the LLM are not touched.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emit_jax import checkpoint, hf
from emit_jax.errors import CheckpointError, ConfigError
from emit_jax.models import scan

#: the packaged ViT (architecture ``tiny``), in ``emit_jax/assets/``
PACKAGED = "vit_tiny_embedded_label_free.safetensors"
PREFIX = "vision_tower."
FORMAT = "emit_jax vision tower"


def packaged_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        PACKAGED)


def vision_tensors(model) -> dict[str, np.ndarray]:
    """``model``'s ViT parameters: transformers' key -> array in transformers' layout."""
    return {key: np.asarray(hf.to_hf_layout(path, np.asarray(value if layer is None
                                                               else value[layer])))
            for key, path, value, layer in hf.iter_hf_tensors(model) if key.startswith(PREFIX)}


def save_vision(model, path: str, meta: dict) -> None:
    """Write ``model``'s ViT to ``path`` (safetensors, float32) with ``meta`` (JSON-able) as the
    file's metadata; written whole or not at all."""
    from safetensors.numpy import save  # noqa: PLC0415

    from emit_jax.fileio import atomic_output  # noqa: PLC0415

    tensors = {k: v.astype(np.float32) for k, v in vision_tensors(model).items()}
    data = save(tensors, metadata={"format": FORMAT, "meta": json.dumps(meta)})
    with atomic_output(path, "wb") as f:
        f.write(data)


def metadata(path: str) -> dict:
    """The ``meta`` a ``.safetensors`` file of :func:`save_vision` was written with."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(path, framework="numpy") as f:
        md = f.metadata() or {}
    if md.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vision-tower file of emit_jax (metadata format "
                         f"{md.get('format')!r})")
    return json.loads(md.get("meta") or "{}")


def read_vision(source: str) -> tuple[dict[str, np.ndarray], str]:
    """(tensors, where) of ``vision_init`` ``source`` (see the module docstring); ``where``
    names the file for messages. Raises ``ConfigError`` naming ``source`` and the problem."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    path = packaged_path() if source == "embedded" else source
    try:
        if os.path.isdir(path):
            model = checkpoint.load_model_folder(path)[0]
            model = getattr(model, "mllm", model)  # an EMIT checkpoint: its InternVL
            return vision_tensors(model), path
        if not os.path.isfile(path):
            raise ConfigError(f"config vision_init: {source!r} is not a file or folder "
                              "(give 'embedded', a .safetensors file of a vision tower or a "
                              "model folder)")
        metadata(path)
        return load_file(path), path
    except (CheckpointError, ValueError, OSError, SafetensorError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config vision_init {source}: {e}") from None


def apply_vision(model, tensors: dict[str, np.ndarray], where: str) -> int:
    """Set ``model``'s ViT parameters from ``tensors`` (transformers' keys and layouts; stacked
    layers filled layer by layer); every ViT key must be there, with the model's shape, and no
    other. Returns the number of values set. Raises ``ConfigError`` naming ``where``."""
    state = nnx.state(model, nnx.Param)
    flat = [(p, v) for p, v in nnx.to_flat_state(state) if p[0] == "vision_tower"]
    want = {hf.hf_key(u) for p, v in flat for u in hf.unstacked_paths(p, v)}
    have = {k for k in tensors if k.startswith(PREFIX)}
    missing, extra = sorted(set(want) - have), sorted(have - set(want))
    if missing or extra:
        raise ConfigError(f"config vision_init {where}: its vision tower does not match the "
                          f"model's: {len(missing)} missing (e.g. {missing[:2]}), {len(extra)} "
                          f"unexpected (e.g. {extra[:2]})")
    n = 0
    for path, var in flat:
        parts = []
        for u in hf.unstacked_paths(path, var):
            arr = hf.from_hf_layout(u, np.asarray(tensors[hf.hf_key(u)]))
            shape = tuple(var.shape[1:]) if scan.is_stacked(path) else tuple(var.shape)
            if path[-1] == "position_embeddings" and arr.shape != shape:
                arr = resize_positions(arr, shape)
            if tuple(arr.shape) != shape:
                raise ConfigError(f"config vision_init {where}: {hf.hf_key(u)} has shape "
                                  f"{tuple(arr.shape)}, the model's is {shape}")
            parts.append(arr)
        value = np.stack(parts) if scan.is_stacked(path) else parts[0]
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
        n += 1
    nnx.update(model, state)
    return n


def resize_positions(pos: np.ndarray, shape: tuple) -> np.ndarray:
    """ViT position embeddings ``[1, 1 + g*g, D]`` (the class token's, then the patch grid's)
    resized to ``shape`` ``[1, 1 + h*h, D]`` (another ``image_size``): the grid bilinearly,
    the class token's kept. Other shapes are returned as they are (the caller's check names
    them)."""
    g, h = int(round((pos.shape[1] - 1) ** 0.5)), int(round((shape[1] - 1) ** 0.5))
    if len(shape) != 3 or pos.shape[0] != 1 or shape[0] != 1 or pos.shape[2] != shape[2] or \
            g * g + 1 != pos.shape[1] or h * h + 1 != shape[1]:
        return pos
    grid = pos[0, 1:].reshape(g, g, -1)
    grid = np.asarray(jax.image.resize(grid, (h, h, grid.shape[-1]), "bilinear"), pos.dtype)
    return np.concatenate([pos[:, :1], grid.reshape(1, h * h, -1)], axis=1)
