"""Hugging Face interop: ``load`` a transformers InternVL folder into the NNX model, ``save`` it back.

- Reads ``config.json`` plus ``model.safetensors`` or ``model.safetensors.index.json`` + shards,
  one tensor at a time (the model is built abstractly first, so host memory never holds a second
  full copy of the weights). Both key layouts are accepted: the on-disk one transformers writes
  (``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``,
  ``language_model.lm_head.weight``) and the in-memory v5 one (``model.language_model.*`` ...).
- Writes ``config.json`` + safetensors shards (with an index when there is more than one) that
  ``transformers.InternVLForConditionalGeneration.from_pretrained`` loads with no custom code and
  no missing or unexpected keys. dtypes are kept per tensor, so bf16 stays bf16 bit for bit.
- A model with stacked layers (``InternVLConfig.scan_layers``, ``emit_jax.models.scan``) reads
  and writes the same files: each layer's tensor fills its slot of the stacked array on load and
  is written from that slot, under its per-layer key and in the same order, on save.
- Only safetensors is ever read: no pickle, no ``torch.load``, no remote code.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from emit_jax.errors import CheckpointError
from emit_jax.fileio import atomic_folder, current_umask, not_a_file, read_json, where_written
from emit_jax.models import scan
from emit_jax.models.config import ConfigError, InternVLConfig, dtype_name, read_hf_config
from emit_jax.models.internvl import InternVL

SAFE_SINGLE = "model.safetensors"
EMIT_EXTRAS = "emit_extras.safetensors"  # soft prompt + heat-map projector, beside the InternVL weights
SAFE_INDEX = "model.safetensors.index.json"
# Files that travel with a checkpoint: tokenizer, processor, chat template, generation defaults.
ASSET_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "generation_config.json",
)


# ----------------------------------------------------------------------------- key mapping
def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def hf_key(path: tuple) -> str:
    """NNX parameter path -> the key transformers writes on disk."""
    s = _path_str(path)
    leaf = path[-1]
    head, _, _ = s.rpartition(".")
    if head.startswith("vision_tower."):
        head = head.replace("vision_tower.layers.", "vision_tower.encoder.layer.", 1)
        head = head.replace("vision_tower.embeddings.patch_embeddings",
                            "vision_tower.embeddings.patch_embeddings.projection", 1)
    elif head.startswith("language_model."):
        head = "language_model.model." + head[len("language_model."):]
    elif head == "lm_head":
        head = "language_model.lm_head"
    elif path == ("language_model",):
        head = "language_model.model"
    name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return f"{head}.{name}" if head else name


def normalize_hf_key(key: str) -> str:
    """Accept transformers' in-memory (v5) names as well as the on-disk ones."""
    if key.startswith("model.language_model."):
        rest = key[len("model.language_model."):]
        return "language_model.model." + rest[len("model."):] if rest.startswith("model.") \
            else "language_model.model." + rest
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    for prefix in ("model.vision_tower.", "model.multi_modal_projector."):
        if key.startswith(prefix):
            return key[len("model."):]
    return key


def to_hf_layout(path: tuple, x: np.ndarray) -> np.ndarray:
    """Our layout -> transformers' (Linear kernels ``[in, out] -> [out, in]``, conv
    ``[kh, kw, cin, cout] -> [cout, cin, kh, kw]``)."""
    if path[-1] == "kernel":
        if x.ndim == 2:
            return np.ascontiguousarray(x.T)
        if x.ndim == 4:
            return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x


def from_hf_layout(path: tuple, x: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if x.ndim == 2:
            return np.ascontiguousarray(x.T)
        if x.ndim == 4:
            return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    return x


# ----------------------------------------------------------------------------- reading
def _check_readable(path: str) -> None:
    """Raise ``CheckpointError`` with the real reason when ``path`` cannot be opened: safetensors
    says "No such file or directory" for a file that is there but may not be read."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # a pipe does not block
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


class SafetensorsReader:
    """Lazily reads tensors from a folder's ``model.safetensors`` or sharded index."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = os.fspath(hf_dir)
        index = os.path.join(self.dir, SAFE_INDEX)
        single = os.path.join(self.dir, SAFE_SINGLE)
        self.key_file: dict[str, str] = {}
        # transformers' order: the single file first, an index beside it is not read
        if os.path.isfile(single):
            for k in self._open(single).keys():
                self.key_file[k] = single
        elif os.path.isfile(index):
            data = read_json(index, error=CheckpointError, what="a valid safetensors index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index}: not a valid safetensors index (expected "
                                      "{\"weight_map\": {tensor: shard file name}})")
            for k, fname in weight_map.items():
                if os.path.basename(fname) != fname:
                    raise CheckpointError(f"{index}: shard name {fname!r} leaves the folder")
                self.key_file[k] = os.path.join(self.dir, fname)
        else:
            for name in (index, single):  # there, but a link loop, a pipe, a folder
                if kind := not_a_file(name):
                    raise CheckpointError(f"{name}: {kind}, not a weights file")
            found = sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []
            bad = [f for f in found if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
            extra = (f"; {bad[0]} is a pickle-based format, which is never loaded (convert it to "
                     "safetensors)") if bad else ""
            raise CheckpointError(f"{self.dir}: no {SAFE_SINGLE} or {SAFE_INDEX}{extra}")
        self._handles: dict[str, object] = {}
        self.keys = {normalize_hf_key(k): k for k in self.key_file}

    def _open(self, path: str):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard listed in the index is missing")
        _check_readable(path)
        try:
            return safe_open(path, framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def get(self, norm_key: str) -> np.ndarray:
        return self.get_raw(self.keys[norm_key])

    def get_raw(self, raw: str) -> np.ndarray:
        """The tensor stored under ``raw`` (the key as written in the file)."""
        path = self.key_file[raw]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        try:
            return self._handles[path].get_tensor(raw)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {raw!r} ({e})") from None

    def close(self):
        self._handles.clear()


def export_problem(hf_dir: str | os.PathLike) -> str | None:
    """Why the export ``hf_dir`` cannot be loaded as it is (its config.json not a JSON object,
    a weights file missing, torn or unreadable: one short reason), or None. Reads the files'
    headers only, not the tensors."""
    hf_dir = os.fspath(hf_dir)
    try:
        cfg = read_json(os.path.join(hf_dir, "config.json"), error=CheckpointError,
                        what="a model config")
        if not isinstance(cfg, dict):
            return f"{os.path.join(hf_dir, 'config.json')}: not a JSON object"
        reader = SafetensorsReader(hf_dir)
        for path in sorted(set(reader.key_file.values()) | {
                os.path.join(hf_dir, f) for f in os.listdir(hf_dir)
                if f.endswith(".safetensors")}):
            reader._open(path)
    except (CheckpointError, OSError) as e:
        return str(e)
    return None


def is_internvl_chat(folder: str | os.PathLike) -> bool:
    """Whether ``folder/config.json`` is the original ``internvl_chat`` format."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        return False
    raw = read_json(path, error=ConfigError, what="valid JSON")
    return isinstance(raw, dict) and raw.get("model_type") == "internvl_chat"


def read_config(folder: str | os.PathLike) -> tuple[InternVLConfig, dict]:
    """``(config, raw config.json)`` of a transformers InternVL or an ``internvl_chat`` folder;
    errors name the file."""
    if is_internvl_chat(folder):
        from emit_jax import internvl_chat

        return internvl_chat.read_config(folder)
    return read_hf_config(folder)


def _abstract_model(cfg: InternVLConfig):
    abstract = nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def load(hf_dir: str | os.PathLike, dtype: str | None = None, *,
         put: Callable[[tuple, np.ndarray], jax.Array] | None = None,
         scan_layers: bool = False) -> InternVL:
    """Build the NNX model from ``hf_dir/config.json`` and fill it from its safetensors.

    Returns an ``InternVL``, or an ``EMIT`` model when the folder also holds
    ``emit_extras.safetensors`` (soft prompt, BatchNorm, conv; written by :func:`save`). A folder
    in the original ``internvl_chat`` format (OpenGVLab's releases, the EMIT authors' EMIT-8B) is
    read by :func:`emit_jax.internvl_chat.load` with the authors' EMIT constants.

    dtype: ``None`` keeps every tensor's stored dtype (bf16 stays bf16); ``'float32'`` /
    ``'bfloat16'`` casts parameters and sets the compute dtype. ``put(path, array)`` places each
    parameter (e.g. ``jax.device_put`` with a sharding); default: the default device.
    ``scan_layers``: build the model with stacked layers (``InternVLConfig.scan_layers``); each
    stacked parameter is filled layer by layer in one host buffer, then placed.
    """
    if is_internvl_chat(hf_dir):
        from emit_jax import internvl_chat

        return internvl_chat.load(hf_dir, dtype, put=put, scan_layers=scan_layers)[0]
    cfg, _ = read_hf_config(hf_dir)
    cfg = cfg.replace(scan_layers=scan_layers)
    reader = SafetensorsReader(hf_dir)
    try:
        model = _load(cfg, reader, dtype, put)
    finally:
        reader.close()
    extras = os.path.join(os.fspath(hf_dir), EMIT_EXTRAS)
    if os.path.isfile(extras):
        model = _load_emit_extras(model, extras, dtype, put)
    elif _names_extras(hf_dir):
        raise CheckpointError(f"{extras}: missing; {os.path.join(os.fspath(hf_dir), 'config.json')}"
                              " says this is an EMIT model (soft prompt and heat-map projector "
                              "in that file), and without it it would run as plain InternVL")
    return model


def _names_extras(hf_dir) -> bool:
    """Whether the folder's ``config.json`` names ``emit_extras.safetensors`` (:func:`save`
    writes the key for an EMIT model)."""
    try:
        with open(os.path.join(os.fspath(hf_dir), "config.json"), encoding="utf-8") as f:
            return json.load(f).get("emit_extras") == EMIT_EXTRAS
    except (OSError, ValueError, AttributeError):
        return False


def _load(cfg: InternVLConfig, reader: SafetensorsReader, dtype, put) -> InternVL:
    emb_key = "language_model.model.embed_tokens.weight"
    head_key = "language_model.lm_head.weight"
    if cfg.tie_word_embeddings and head_key in reader.keys and emb_key in reader.keys:
        # transformers' rule: both present with different values -> not tied.
        if not np.array_equal(reader.get(head_key), reader.get(emb_key)):
            cfg = cfg.replace(tie_word_embeddings=False)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    graphdef, state = _abstract_model(cfg)
    flat = nnx.to_flat_state(state)
    expected = {hf_key(p) for path, var in flat for p in unstacked_paths(path, var)}
    have = set(reader.keys)
    ignorable = {head_key} if cfg.tie_word_embeddings else set()
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected) - ignorable)
    if missing or unexpected:
        raise CheckpointError(
            f"{reader.dir}: weights do not match config.json: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]})")
    put = put or (lambda path, x: jnp.asarray(x))
    values = []
    for path, var in flat:
        if scan.is_stacked(path):  # [L, ...]: each layer's tensor into its slot
            arr = None
            for i, p in enumerate(unstacked_paths(path, var)):
                one = _read(reader, p, tuple(var.shape[1:]), dtype)
                if arr is None:
                    arr = np.empty(tuple(var.shape), one.dtype)
                arr[i] = one
        else:
            arr = _read(reader, path, tuple(var.shape), dtype)
        values.append((path, put(path, arr)))
        del arr
    for path, value in values:
        _set_flat(state, path, value)
    return nnx.merge(graphdef, state)


def unstacked_paths(path: tuple, var) -> list[tuple]:
    """The unrolled paths (each a key of ``hf_key``) a Variable at ``path`` stands for: its own,
    or each layer's when stacked (``emit_jax.models.scan``)."""
    if scan.is_stacked(path):
        return [scan.layer_path(path, i) for i in range(var.shape[0])]
    return [path]


def _read(reader: SafetensorsReader, path: tuple, want: tuple, dtype) -> np.ndarray:
    """The tensor of unrolled ``path`` in our layout, its shape checked against ``want``."""
    key = hf_key(path)
    arr = from_hf_layout(path, reader.get(key))
    if tuple(arr.shape) != want:
        raise CheckpointError(
            f"{reader.key_file[reader.keys[key]]}: tensor {key} has shape {tuple(arr.shape)} "
            f"(in our layout), config.json implies {want}")
    if arr.dtype.kind in "iubc":  # integers, booleans, complex (bfloat16 / float8: kind V)
        # before: an int32 embedding table was loaded and run (and saved) as one
        raise CheckpointError(f"{reader.key_file[reader.keys[key]]}: tensor {key} is stored as "
                              f"{arr.dtype}; every weight of the model is a floating-point "
                              "number (a damaged or mis-converted file)")
    if dtype is not None:
        arr = arr.astype(jnp.dtype(dtype))
    return arr


def _set_flat(state, path, value):
    node = state
    for p in path[:-1]:
        node = node[p]
    var = node[path[-1]]
    if isinstance(var, nnx.Variable):
        var.set_value(value)
    else:
        node[path[-1]] = value


# ----------------------------------------------------------------------------- writing
def iter_hf_tensors(model: InternVL) -> Iterator[tuple[str, tuple, jax.Array, int | None]]:
    """(hf key, unrolled nnx path, array in our layout, layer) for every parameter, in the
    unrolled model's order. ``layer`` is None, or for a stacked Variable (``scan_layers``) the
    index of the entry's tensor ``array[layer]``."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))

    def stack_of(item):  # the stacked layers a Variable belongs to, or None
        path = item[0]
        return path[:path.index(scan.LAYERS) + 1] if scan.is_stacked(path) else None

    for stack, items in itertools.groupby(flat, key=stack_of):
        items = [(path, var.get_value()) for path, var in items]
        if stack is None:
            for path, value in items:
                yield hf_key(path), path, value, None
            continue
        for i in range(items[0][1].shape[0]):  # layer by layer, as the unrolled model
            for path, value in items:
                yield hf_key(scan.layer_path(path, i)), scan.layer_path(path, i), value, i


def hf_tensor_stream(model: InternVL) -> tuple[list[tuple[str, Callable[[], np.ndarray], int]],
                                                str | None]:
    """``([(hf key, load_fn, nbytes)], majority dtype)`` for :func:`write_safetensors`: each
    ``load_fn`` fetches one tensor in transformers' layout when called; per-tensor dtypes may be
    mixed, so the dtype holding the most elements is the folder's (None without parameters)."""
    tensors, counts = [], {}
    for key, path, arr, layer in iter_hf_tensors(model):
        size = arr.size if layer is None else arr.size // arr.shape[0]
        counts[dtype_name(arr.dtype)] = counts.get(dtype_name(arr.dtype), 0) + size
        tensors.append((key, (lambda p=path, a=arr, i=layer: to_hf_layout(p, np.asarray(
            jax.device_get(a if i is None else a[i])))), size * arr.dtype.itemsize))
    return tensors, (max(counts, key=counts.get) if counts else None)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"bad shard size {size!r} (e.g. '5GB', '500MB', 1000000)")
    mult = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
            "GIB": 2**30}[m.group(2).upper() if m.group(2) else None]
    try:
        return int(float(m.group(1)) * mult)
    except OverflowError:  # hundreds of digits: float infinity
        raise ValueError(f"shard size {size!r} is too large") from None


def state_bytes(model) -> int:
    """Bytes of every array of ``model`` (parameters and statistics) as stored."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(nnx.state(model)) if hasattr(x, "dtype"))


def _save_file(arrays: dict, path: str, metadata: dict) -> None:
    """``safetensors.numpy.save_file``; a failed write (full disk, ...) becomes an ``OSError``
    naming ``path`` rather than the library's ``SafetensorError``."""
    try:
        save_file(arrays, path, metadata=metadata)
        # the library creates the file 0600: give it the mode ordinary creation would (the
        # umask's), as every other file of the folder has (a file system without modes keeps
        # what it gives)
        try:
            os.chmod(path, 0o666 & ~current_umask())
        except OSError:
            pass
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        if m:
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), path) from None
        raise CheckpointError(f"{path}: cannot write safetensors ({e})") from None


def write_safetensors(tensors: Iterable[tuple[str, Callable[[], np.ndarray], int]],
                      out_dir: str, max_shard_size: int | str = "5GB") -> list[str]:
    """Stream ``(key, load_fn, nbytes)`` into shards of at most ``max_shard_size`` bytes (one
    shard in host memory at a time); writes the index when there is more than one shard.
    Returns the file names written."""
    limit = _parse_size(max_shard_size)
    plan: list[list[tuple[str, Callable[[], np.ndarray]]]] = [[]]
    size = 0
    total = 0
    for key, fn, nbytes in tensors:
        if plan[-1] and size + nbytes > limit:
            plan.append([])
            size = 0
        plan[-1].append((key, fn))
        size += nbytes
        total += nbytes
    n = len(plan)
    names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                          for i in range(n)]
    weight_map = {}
    for name, shard in zip(names, plan):
        arrays = {key: np.require(fn(), requirements="C") for key, fn in shard}  # keeps 0-d
        _save_file(arrays, os.path.join(out_dir, name), metadata={"format": "pt"})
        for key in arrays:
            weight_map[key] = name
        del arrays
    if n > 1:
        with open(os.path.join(out_dir, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return names


def save(model: InternVL, out_dir: str | os.PathLike, *, base_config: dict | None = None,
         max_shard_size: int | str = "5GB", assets_from: str | os.PathLike | None = None) -> str:
    """Write ``config.json`` + safetensors for transformers' InternVLForConditionalGeneration.

    base_config: the source folder's config.json (keeps fields this port does not model).
    assets_from: a folder whose tokenizer / processor / generation files are copied along.
    The folder is assembled in a temporary sibling and renamed into place, so an interrupted
    save never leaves a half-written ``out_dir``.
    """
    out_dir = where_written(out_dir)  # LINK/../NAME as the kernel reads it
    emit_model = None
    if not isinstance(model, InternVL):
        emit_model, model = model, model.mllm
    with atomic_folder(out_dir, hint="choose a new folder") as tmp:
        cfg = model.config
        hf_cfg = cfg.to_hf_dict(base_config)
        tensors, dtype = hf_tensor_stream(model)
        if dtype is not None:
            hf_cfg["dtype"] = dtype
        if emit_model is not None:  # a loader can tell a missing extras file from a plain model
            hf_cfg["emit_extras"] = EMIT_EXTRAS
        write_safetensors(tensors, tmp, max_shard_size)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_cfg, f, indent=2)
        if emit_model is not None:
            _save_emit_extras(emit_model, os.path.join(tmp, EMIT_EXTRAS))
        if assets_from is not None:
            copy_assets(assets_from, tmp)
    return out_dir


# ----------------------------------------------------------------------------- EMIT extras
# (our path, key in emit_extras.safetensors); conv kernels stored in PyTorch layout.
_EMIT_KEYS = (
    (("soft_prompt",), "soft_prompt"),
    (("projector", "bn", "scale"), "projector.bn.weight"),
    (("projector", "bn", "bias"), "projector.bn.bias"),
    (("projector", "bn", "mean"), "projector.bn.running_mean"),
    (("projector", "bn", "var"), "projector.bn.running_var"),
    (("projector", "conv", "kernel"), "projector.conv.weight"),
    (("projector", "conv", "bias"), "projector.conv.bias"),
)
_MAX_READOUT_KEY = (("projector", "max_proj"), "projector.max_proj.weight")  # emit.max_readout


_PEAK_LOCATION_KEYS = (  # emit.peak_location
    (("projector", "loc_embed"), "projector.loc_embed.weight"),
    (("projector", "loc_temp"), "projector.loc_temp"))


_HOT_PATCHES_KEY = (("projector", "hot_proj"), "projector.hot_proj.weight")  # emit.hot_patches


def _emit_keys(ecfg) -> tuple:
    return _EMIT_KEYS + ((_MAX_READOUT_KEY,) if ecfg.max_readout else ()) + \
        (_PEAK_LOCATION_KEYS if ecfg.peak_location else ()) + \
        ((_HOT_PATCHES_KEY,) if ecfg.hot_patches else ())


def emit_tensors(model) -> dict[str, np.ndarray]:
    """EMIT's own tensors of ``model`` under their ``emit_extras.safetensors`` names, conv
    kernels in PyTorch layout."""
    state = dict(nnx.to_flat_state(nnx.state(model)))
    arrays = {}
    for ours, key in _emit_keys(model.emit_config):
        arr = np.asarray(jax.device_get(state[ours].get_value()))
        arrays[key] = np.ascontiguousarray(to_hf_layout(ours, arr))
    return arrays


def _save_emit_extras(model, path: str) -> None:
    meta = {"format": "pt", "emit_config": json.dumps(model.emit_config.to_json_dict())}
    _save_file(emit_tensors(model), path, metadata=meta)


def _load_emit_extras(mllm: InternVL, path: str, dtype, put):
    from emit_jax.models.emit import EMITConfig

    _check_readable(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        ecfg = EMITConfig.from_json_dict(json.loads(meta["emit_config"]))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid EMIT extras file ({type(e).__name__}: {e})") from None
    return emit_from_tensors(mllm, ecfg, tensors, dtype, put, source=path)


def emit_from_tensors(mllm: InternVL, ecfg, tensors: dict[str, np.ndarray], dtype, put,
                      *, source: str, names: dict[str, str] | None = None):
    """An ``EMIT`` model around ``mllm`` whose soft prompt and projector come from ``tensors``
    (keyed by the ``emit_extras`` names, or by ``names[extras name]``; PyTorch layout).
    Errors name ``source``."""
    from emit_jax.models.emit import EMIT

    names = names or {}
    if ecfg.comp_token_id is None or not 0 <= ecfg.comp_token_id < mllm.config.text.vocab_size:
        raise CheckpointError(f"{source}: comp_token_id {ecfg.comp_token_id} is outside the "
                              f"vocabulary of config.json ({mllm.config.text.vocab_size})")
    model = EMIT(mllm, ecfg, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    put = put or (lambda p, x: jnp.asarray(x))
    for ours, key in _emit_keys(ecfg):
        key = names.get(key, key)
        if key not in tensors:
            raise CheckpointError(f"{source}: missing tensor {key!r}")
        var = _get_flat(state, ours)
        arr = from_hf_layout(ours, tensors[key])
        if tuple(arr.shape) != tuple(var.shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(arr.shape)}, expected "
                                  f"{tuple(var.shape)}")
        if dtype is not None and ours[-1] != "mean" and ours[-1] != "var":
            arr = arr.astype(jnp.dtype(dtype))
        var.set_value(put(ours, arr))
    nnx.update(model, state)
    return model


def _get_flat(state, path):
    node = state
    for p in path:
        node = node[p]
    return node


def copy_assets(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer / processor / generation files from ``src`` to ``dst``: their contents,
    made with the umask's permissions as every other output (twenty-second probe U01: the
    source's mode was copied, 644 under ``umask 077``)."""
    copied = []
    src = os.fspath(src)
    for name in ASSET_PATTERNS:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(os.fspath(dst), name))
            copied.append(name)
    return copied


__all__ = ["load", "save", "read_config", "is_internvl_chat", "hf_key", "normalize_hf_key", "SafetensorsReader", "CheckpointError",
           "ConfigError", "copy_assets", "write_safetensors"]
