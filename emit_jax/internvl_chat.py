"""The original InternVL ``internvl_chat`` format, both ways: OpenGVLab's remote-code releases
(``OpenGVLab/InternVL3-8B``) and the EMIT authors' released model (``gw49/EMIT-8B``).

That format is what ``InternVLChatModel.save_pretrained`` writes, and what the EMIT authors'
``CustomizedInternVLChatModel`` writes after merging LoRA (their ``combine_model.py``):

- ``vision_model.*``: InternViT with one fused ``attn.qkv`` per layer (rows q, then k, then v),
  ``attn.proj``, ``norm1/2``, ``ls1/2``, ``mlp.fc1/2``; ``embeddings.class_embedding``,
  ``embeddings.patch_embedding``, ``embeddings.position_embedding``; no final norm.
- ``language_model.model.*`` and ``language_model.lm_head.weight`` (always untied): Qwen2 under
  the same names transformers uses.
- ``mlp1.0`` (LayerNorm), ``mlp1.1`` (Linear), ``mlp1.3`` (Linear): the vision-to-LLM projector.
- EMIT only: ``soft_prompt.weight`` (an ``nn.Embedding(9, D)``), ``projector.0.*``
  (``BatchNorm2d(1)``: ``weight``, ``bias``, ``running_mean``, ``running_var``,
  ``num_batches_tracked``) and ``projector.1.*`` (``Conv2d(1, D, 4, stride 2, padding 1)``).

Nothing EMIT-specific is in the authors' config.json: the CE layers (4, 8, 16, 20), the 9 soft
tokens and the 4 reference rotations are hard-coded, the window comes from the ``NEIGHBOR_DIS``
environment variable (default 6), and the ``<COMP_CONTEXT>`` and ``<IMG_CONTEXT>`` ids from the
tokenizer. :func:`load` takes those constants (overridable); :func:`save` refuses an EMIT model
their code cannot represent.

Reading goes through :class:`emit_jax.hf.SafetensorsReader` (safetensors only, shard by shard,
one tensor at a time); the names are translated to transformers' on-disk ones, so the model is
filled and checked by the same code as a transformers folder.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Callable, Iterator

import jax
import numpy as np

from emit_jax import hf
from emit_jax.errors import CheckpointError, ConfigError
from emit_jax.fileio import atomic_folder, read_json, where_written
from emit_jax.models.config import InternVLConfig, read_config_json
from emit_jax.models.emit import EMITConfig, is_emit

MODEL_TYPE = "internvl_chat"
TEMPLATE = "internvl2_5"  # InternVL 2.5 / 3's ChatML conversation template
# The authors' hard-coded EMIT constants (CustomizedInternVLChatModel.__init__).
AUTHORS_CE_LAYERS = (4, 8, 16, 20)
AUTHORS_SOFT_TOKENS = 9
AUTHORS_ROTATIONS = 4
AUTHORS_WINDOW = 6  # NEIGHBOR_DIS's default
AUTHORS_PATCH = 14  # their projector's token count assumes 14 px patches
AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}

# internvl_chat name <-> transformers' on-disk name; {i} a layer, {w} weight|bias, {rest} the rest.
RENAMES = (
    ("vision_model.embeddings.class_embedding", "vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.patch_embedding.{w}",
     "vision_tower.embeddings.patch_embeddings.projection.{w}"),
    ("vision_model.embeddings.position_embedding", "vision_tower.embeddings.position_embeddings"),
    ("vision_model.encoder.layers.{i}.attn.proj.{w}",
     "vision_tower.encoder.layer.{i}.attention.projection_layer.{w}"),
    ("vision_model.encoder.layers.{i}.attn.q_norm.{w}",
     "vision_tower.encoder.layer.{i}.attention.q_norm.{w}"),
    ("vision_model.encoder.layers.{i}.attn.k_norm.{w}",
     "vision_tower.encoder.layer.{i}.attention.k_norm.{w}"),
    ("vision_model.encoder.layers.{i}.mlp.fc1.{w}", "vision_tower.encoder.layer.{i}.mlp.fc1.{w}"),
    ("vision_model.encoder.layers.{i}.mlp.fc2.{w}", "vision_tower.encoder.layer.{i}.mlp.fc2.{w}"),
    ("vision_model.encoder.layers.{i}.norm1.{w}",
     "vision_tower.encoder.layer.{i}.layernorm_before.{w}"),
    ("vision_model.encoder.layers.{i}.norm2.{w}",
     "vision_tower.encoder.layer.{i}.layernorm_after.{w}"),
    ("vision_model.encoder.layers.{i}.ls1", "vision_tower.encoder.layer.{i}.lambda_1"),
    ("vision_model.encoder.layers.{i}.ls2", "vision_tower.encoder.layer.{i}.lambda_2"),
    ("mlp1.0.{w}", "multi_modal_projector.layer_norm.{w}"),
    ("mlp1.1.{w}", "multi_modal_projector.linear_1.{w}"),
    ("mlp1.3.{w}", "multi_modal_projector.linear_2.{w}"),
    ("language_model.{rest}", "language_model.{rest}"),
)
QKV = ("vision_model.encoder.layers.{i}.attn.qkv.{w}",
       "vision_tower.encoder.layer.{i}.attention.{part}_proj.{w}")
QKV_PARTS = ("q", "k", "v")
# the authors' EMIT names <- emit_jax's emit_extras names (hf._EMIT_KEYS)
EMIT_NAMES = {
    "soft_prompt": "soft_prompt.weight",
    "projector.bn.weight": "projector.0.weight",
    "projector.bn.bias": "projector.0.bias",
    "projector.bn.running_mean": "projector.0.running_mean",
    "projector.bn.running_var": "projector.0.running_var",
    "projector.conv.weight": "projector.1.weight",
    "projector.conv.bias": "projector.1.bias",
}
NUM_BATCHES_TRACKED = "projector.0.num_batches_tracked"
EMIT_KEYS = frozenset(EMIT_NAMES.values()) | {NUM_BATCHES_TRACKED}

_FIELDS = {"i": r"(?P<i>\d+)", "w": r"(?P<w>weight|bias)", "rest": r"(?P<rest>.+)",
           "part": r"(?P<part>[qkv])"}


def _pattern(fmt: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", fmt):
        out += re.escape(fmt[pos:m.start()]) + _FIELDS[m.group(1)]
        pos = m.end()
    return re.compile(out + re.escape(fmt[pos:]) + r"\Z")


_TO_HF = [(_pattern(c), h) for c, h in RENAMES]
_TO_CHAT = [(_pattern(h), c) for c, h in RENAMES]
_QKV_CHAT, _QKV_HF = _pattern(QKV[0]), _pattern(QKV[1])


def to_hf_key(key: str) -> str | None:
    """internvl_chat name -> transformers' on-disk name (None: not a renamed tensor)."""
    for pat, fmt in _TO_HF:
        m = pat.match(key)
        if m:
            return fmt.format(**m.groupdict())
    return None


def to_chat_key(key: str) -> str | None:
    """transformers' on-disk name -> internvl_chat name (the fused qkv for q/k/v_proj)."""
    m = _QKV_HF.match(key)
    if m:
        return QKV[0].format(i=m["i"], w=m["w"])
    for pat, fmt in _TO_CHAT:
        m = pat.match(key)
        if m:
            return fmt.format(**m.groupdict())
    return None


# ----------------------------------------------------------------------------- tokenizer ids
def added_token_ids(folder: str | os.PathLike) -> dict[str, int]:
    """``{token: id}`` of the added tokens the folder's tokenizer files declare
    (``tokenizer.json``, ``tokenizer_config.json``'s ``added_tokens_decoder``,
    ``added_tokens.json``), read as JSON without building a tokenizer."""
    folder = os.fspath(folder)
    ids: dict[str, int] = {}

    def load(name):
        path = os.path.join(folder, name)
        return read_json(path, error=CheckpointError, what="valid JSON") \
            if os.path.isfile(path) else None

    tj = load("tokenizer.json")
    if isinstance(tj, dict):
        for t in tj.get("added_tokens") or []:
            if isinstance(t, dict) and isinstance(t.get("id"), int):
                ids[str(t.get("content"))] = t["id"]
    tc = load("tokenizer_config.json")
    if isinstance(tc, dict) and isinstance(tc.get("added_tokens_decoder"), dict):
        for i, t in tc["added_tokens_decoder"].items():
            if isinstance(t, dict) and str(i).isdigit():
                ids.setdefault(str(t.get("content")), int(i))
    at = load("added_tokens.json")
    if isinstance(at, dict):
        for k, v in at.items():
            if isinstance(v, int):
                ids.setdefault(k, v)
    return ids


# ----------------------------------------------------------------------------- config
def config_from_chat(raw: dict, *, image_token_id: int, source: str = "config.json"
                     ) -> InternVLConfig:
    """An ``InternVLChatConfig`` dict -> :class:`InternVLConfig`. Absent fields take the
    authors' classes' defaults (``InternVisionConfig``, transformers' ``Qwen2Config``)."""
    if raw.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{source}: model_type is {raw.get('model_type')!r}, expected "
                          f"{MODEL_TYPE!r}")
    ps = raw.get("ps_version", "v1")  # InternVLChatConfig's default
    if ps != "v2":
        raise ConfigError(
            f"{source}: ps_version {ps!r} is not supported: only the 'v2' pixel shuffle "
            "(InternVL 2.5 / 3) is implemented; 'v1' (InternVL 1.5 era) orders the shuffled grid "
            "differently")
    v = raw.get("vision_config")
    llm = raw.get("llm_config")
    if not isinstance(v, dict) or not isinstance(llm, dict):
        raise ConfigError(f"{source}: an internvl_chat config needs vision_config and llm_config")
    arch = (llm.get("architectures") or [""])[0]
    if arch != "Qwen2ForCausalLM" or llm.get("model_type", "qwen2") != "qwen2":
        raise ConfigError(f"{source}: llm_config is {arch or llm.get('model_type')!r}; only "
                          "Qwen2ForCausalLM (InternVL3 / 2.5 with a Qwen2.5 LLM) is supported")
    size = v.get("image_size", 224)
    force = raw.get("force_image_size")
    if force not in (None, size):
        raise ConfigError(f"{source}: force_image_size {force} differs from vision_config."
                          f"image_size {size}; resized position embeddings are not supported")
    if raw.get("pad2square"):
        raise ConfigError(f"{source}: pad2square=true is not supported")
    text = {k: x for k, x in llm.items() if k != "architectures"}
    text["model_type"] = "qwen2"
    hf_dict = {
        "model_type": "internvl",
        "vision_config": {
            "hidden_size": v.get("hidden_size", 3200),
            "intermediate_size": v.get("intermediate_size", 12800),
            "num_hidden_layers": v.get("num_hidden_layers", 48),
            "num_attention_heads": v.get("num_attention_heads", 25),
            "image_size": size, "patch_size": v.get("patch_size", 14),
            "num_channels": v.get("num_channels", 3),
            "norm_type": v.get("norm_type", "rms_norm"),
            "use_qk_norm": bool(v.get("qk_normalization", True)),
            "attention_bias": bool(v.get("qkv_bias", False)),
            "layer_norm_eps": v.get("layer_norm_eps", 1e-6),
            "layer_scale_init_value": v.get("initializer_factor", 0.1),
            "use_mean_pooling": True,  # InternVisionModel has no final norm
            "hidden_act": v.get("hidden_act", "gelu"),
        },
        "text_config": text,
        "image_token_id": image_token_id,
        "downsample_ratio": raw.get("downsample_ratio", 0.5),
        "vision_feature_layer": raw.get("select_layer", -1),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,  # InternVLChatConfig forces it off
        "dtype": raw.get("torch_dtype") or llm.get("torch_dtype"),
    }
    return InternVLConfig.from_hf_dict(hf_dict, source=source)


def read_config(folder: str | os.PathLike) -> tuple[InternVLConfig, dict]:
    """``(config, raw config.json)`` of an internvl_chat folder; the image token id comes from
    the folder's tokenizer files."""
    path, raw = read_config_json(folder)
    img = added_token_ids(folder).get("<IMG_CONTEXT>")
    if img is None:
        raise ConfigError(f"{folder}: no tokenizer files declaring <IMG_CONTEXT> (an internvl_chat "
                          "folder keeps the image token's id only in its tokenizer)")
    return config_from_chat(raw, image_token_id=img, source=path), raw


def chat_config(cfg: InternVLConfig, *, emit: bool, base: dict | None = None,
                dtype: str | None = None, token_ids: dict[str, int] | None = None) -> dict:
    """The ``InternVLChatConfig``-shaped config.json for ``cfg``. ``base`` (a source
    internvl_chat config.json) keeps the fields this port does not model (dynamic tiling,
    generation ids, ...); otherwise InternVL3's values are used."""
    d = copy.deepcopy(base) if base and base.get("model_type") == MODEL_TYPE else {}
    v, t = cfg.vision, cfg.text
    dtype = dtype or cfg.param_dtype
    for k, x in {"use_backbone_lora": 0, "use_llm_lora": 0, "pad2square": False,
                 "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
                 "max_dynamic_patch": 12}.items():
        d.setdefault(k, x)
    d.update({
        "architectures": ["CustomizedInternVLChatModel" if emit else "InternVLChatModel"],
        "auto_map": dict(AUTO_MAP),
        "model_type": MODEL_TYPE,
        "template": TEMPLATE,
        "ps_version": "v2",
        "select_layer": cfg.vision_feature_layer,
        "force_image_size": v.image_size,
        "downsample_ratio": cfg.downsample_ratio,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    })
    vc = dict(d.get("vision_config") or {})
    for k, x in {"drop_path_rate": 0.0, "dropout": 0.0, "attention_dropout": 0.0,
                 "initializer_range": 0.02, "use_flash_attn": True}.items():
        vc.setdefault(k, x)
    vc.update({
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
        "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
        "norm_type": v.norm_type, "qk_normalization": v.use_qk_norm, "qkv_bias": v.attention_bias,
        "layer_norm_eps": v.layer_norm_eps, "initializer_factor": v.layer_scale_init_value,
        "hidden_act": v.hidden_act, "torch_dtype": dtype,
    })
    lc = dict(d.get("llm_config") or {})
    for k in ("rope_parameters", "head_dim"):
        lc.pop(k, None)
    ids = token_ids or {}
    lc.setdefault("bos_token_id", ids.get("<|endoftext|>", 151643))
    lc.setdefault("eos_token_id", ids.get("<|im_end|>", 151645))
    lc.update({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": ({"factor": t.rope_factor, "rope_type": t.rope_type, "type": t.rope_type}
                         if t.rope_type != "default" else None),
        "max_position_embeddings": t.max_position_embeddings, "hidden_act": t.hidden_act,
        "tie_word_embeddings": False, "use_sliding_window": False, "torch_dtype": dtype,
    })
    d["vision_config"] = vc
    d["llm_config"] = lc
    return d


# ----------------------------------------------------------------------------- reading
class ChatReader:
    """An internvl_chat folder's tensors under transformers' on-disk names (the fused qkv
    split into q/k/v on the fly), for :func:`emit_jax.hf._load`; EMIT's tensors apart."""

    def __init__(self, folder: str | os.PathLike):
        self.inner = hf.SafetensorsReader(folder)
        self.dir = self.inner.dir
        self.key_file = self.inner.key_file
        self.keys: dict[str, str] = {}  # transformers name -> stored name
        self._part: dict[str, int] = {}  # q/k/v's index in the fused tensor
        self.emit: list[str] = []  # EMIT's stored names
        self._cache: tuple[str, np.ndarray] | None = None
        for raw in self.key_file:
            if raw in EMIT_KEYS:
                self.emit.append(raw)
                continue
            m = _QKV_CHAT.match(raw)
            if m:
                for j, part in enumerate(QKV_PARTS):
                    key = QKV[1].format(i=m["i"], w=m["w"], part=part)
                    self.keys[key], self._part[key] = raw, j
                continue
            self.keys[to_hf_key(raw) or raw] = raw

    def get(self, key: str) -> np.ndarray:
        raw = self.keys[key]
        if key not in self._part:
            return self.inner.get_raw(raw)
        if self._cache is None or self._cache[0] != raw:
            self._cache = (raw, self.inner.get_raw(raw))
        fused = self._cache[1]
        if fused.shape[0] % 3:
            raise CheckpointError(f"{self.key_file[raw]}: {raw} has {fused.shape[0]} rows, not "
                                  "three equal q, k, v blocks")
        n = fused.shape[0] // 3
        j = self._part[key]
        return np.ascontiguousarray(fused[j * n:(j + 1) * n])

    def get_raw(self, raw: str) -> np.ndarray:
        return self.inner.get_raw(raw)

    def close(self):
        self._cache = None
        self.inner.close()


def emit_config_for(cfg: InternVLConfig, *, comp_token_id: int, soft_tokens: int,
                    window: int | None = None, ce_layers=None, bn_mode: str = "official"
                    ) -> EMITConfig:
    """The EMITConfig of the authors' model: CE layers 4/8/16/20, 4 rotations, 0-filled window
    of ``NEIGHBOR_DIS`` (6), their BatchNorm quirk (``bn_mode='official'``) for further
    training as they trained."""
    layers = tuple(ce_layers) if ce_layers else AUTHORS_CE_LAYERS
    depth = cfg.vision.num_hidden_layers
    if any(not 1 <= layer <= depth for layer in layers):
        raise ConfigError(f"CE layers {layers} are outside the ViT's 1..{depth} blocks (the "
                          "authors' model uses 4, 8, 16, 20 of InternViT-300M's 24; pass "
                          "--ce-layers for another ViT)")
    return EMITConfig(ce_layers=layers, window=AUTHORS_WINDOW if window is None else window,
                      rotations=AUTHORS_ROTATIONS, zero_fill=True, num_soft_tokens=soft_tokens,
                      bn_mode=bn_mode, comp_token_id=comp_token_id).validate()


def load(folder: str | os.PathLike, dtype: str | None = None, *,
         put: Callable[[tuple, np.ndarray], jax.Array] | None = None, scan_layers: bool = False,
         window: int | None = None, ce_layers=None, bn_mode: str = "official"):
    """``(model, info)`` from an internvl_chat folder: an ``EMIT`` model when the folder holds
    EMIT's tensors (``soft_prompt.weight``, ``projector.*``), else an ``InternVL``.

    ``window`` / ``ce_layers`` / ``bn_mode`` override the authors' constants (their
    ``NEIGHBOR_DIS`` default 6, layers 4/8/16/20). ``info``: ``{"config": raw config.json,
    "num_batches_tracked": int | None}`` (kept with an Orbax checkpoint so that
    :func:`save` writes the same file back). dtype / put / scan_layers as :func:`hf.load`.
    """
    folder = os.fspath(folder)
    cfg, raw = read_config(folder)
    cfg = cfg.replace(scan_layers=scan_layers)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    reader = ChatReader(folder)
    try:
        model = hf._load(cfg, reader, dtype, put)
        emit = {k: reader.get_raw(k) for k in reader.emit}
    finally:
        reader.close()
    info = {"config": raw, "num_batches_tracked": None}
    if not emit:
        return model, info
    missing = sorted(EMIT_KEYS - set(emit) - {NUM_BATCHES_TRACKED})
    if missing:
        raise CheckpointError(f"{folder}: EMIT tensors incomplete: {', '.join(missing)} missing "
                              f"(found {', '.join(sorted(emit))})")
    comp = added_token_ids(folder).get("<COMP_CONTEXT>")
    if comp is None:
        raise CheckpointError(f"{folder}: the weights hold EMIT's soft prompt and projector but "
                              "the tokenizer files declare no <COMP_CONTEXT> token")
    sp = emit["soft_prompt.weight"]
    if sp.ndim != 2:
        raise CheckpointError(f"{folder}: soft_prompt.weight has shape {sp.shape}, expected "
                              "[tokens, hidden]")
    ecfg = emit_config_for(cfg, comp_token_id=comp, soft_tokens=int(sp.shape[0]), window=window,
                           ce_layers=ce_layers, bn_mode=bn_mode)
    if NUM_BATCHES_TRACKED in emit:
        info["num_batches_tracked"] = int(np.asarray(emit[NUM_BATCHES_TRACKED]).reshape(()))
    model = hf.emit_from_tensors(model, ecfg, emit, dtype, put, source=folder, names=EMIT_NAMES)
    return model, info


# ----------------------------------------------------------------------------- writing
def check_exportable(model) -> list[str]:
    """Raise ``ConfigError`` for what the authors' code cannot represent; return warnings for
    what it can only with a setting of theirs (the window, through ``NEIGHBOR_DIS``)."""
    mllm = model.mllm if is_emit(model) else model
    cfg = mllm.config
    problems, warnings = [], []
    if not cfg.vision.use_mean_pooling:
        problems.append("the ViT has a final LayerNorm (use_mean_pooling=false), which "
                        "InternVisionModel does not")
    t = cfg.text
    if t.head_dim is not None and t.head_dim != t.hidden_size // t.num_attention_heads:
        problems.append(f"head_dim {t.head_dim} is not hidden_size / heads, which their Qwen2 "
                        "config cannot say")
    if is_emit(model):
        e = model.emit_config
        layers = e.layers_for(cfg.vision.num_hidden_layers)
        if tuple(layers) != AUTHORS_CE_LAYERS:
            problems.append(f"CE layers {tuple(layers)} (a {cfg.vision.num_hidden_layers}-block "
                            f"ViT); theirs are hard-coded to {AUTHORS_CE_LAYERS}")
        if e.num_soft_tokens != AUTHORS_SOFT_TOKENS:
            problems.append(f"{e.num_soft_tokens} soft-prompt tokens; theirs are hard-coded to "
                            f"{AUTHORS_SOFT_TOKENS}")
        if e.rotations != AUTHORS_ROTATIONS:
            problems.append(f"{e.rotations} reference rotations; theirs are {AUTHORS_ROTATIONS}")
        if e.reference_turns != 1:
            problems.append(f"reference_turns {e.reference_turns}; theirs turn the reference "
                            "by rot90 only")
        if e.feature_turns != 1:
            problems.append(f"feature_turns {e.feature_turns}; theirs turn the reference by "
                            "rot90 only")
        if not e.zero_fill:
            problems.append("zero_fill=false; their window mask fills with 0")
        if not (e.use_soft_prompt and e.use_contrastive):
            problems.append("an ablation (use_soft_prompt / use_contrastive off); their model "
                            "always uses both")
        if e.max_readout:
            problems.append("max_readout (projector.max_proj) is not part of their projector")
        if e.peak_location:
            problems.append("peak_location (projector.loc_embed) is not part of their projector")
        if e.hot_patches:
            problems.append("hot_patches (projector.hot_proj) is not part of their projector")
        if cfg.vision.patch_size != AUTHORS_PATCH:
            problems.append(f"patch size {cfg.vision.patch_size}; their projector assumes "
                            f"{AUTHORS_PATCH}")
        w = e.window_for(cfg.vision.grid)
        if w != AUTHORS_WINDOW:
            warnings.append(f"the heat map's window is {w} patches, theirs defaults to "
                            f"{AUTHORS_WINDOW}: run their evaluation with NEIGHBOR_DIS={w} in "
                            "the environment")
    if problems:
        raise ConfigError("cannot export to the internvl_chat format: " + "; ".join(problems)
                          + " (python -m emit_jax.export --format transformers keeps everything)")
    return warnings


def chat_tensors(model, *, num_batches_tracked: int = 0, stream=None
                 ) -> Iterator[tuple[str, Callable[[], np.ndarray], int]]:
    """``(internvl_chat name, load_fn, nbytes)`` for every tensor of the authors' layout: fused
    qkv, an untied lm_head (the embedding copied when ours is tied), EMIT's tensors.
    ``stream``: the base model's :func:`hf.hf_tensor_stream` entries, when already made."""
    mllm = model.mllm if is_emit(model) else model
    if stream is None:
        stream, _ = hf.hf_tensor_stream(mllm)
    entries = {key: (fn, nbytes) for key, fn, nbytes in stream}  # transformers name -> ...
    done = set()
    for key, (fn, nbytes) in entries.items():
        name = to_chat_key(key)
        if name is None:
            raise CheckpointError(f"no internvl_chat name for tensor {key}")
        if name in done:
            continue
        done.add(name)
        m = _QKV_HF.match(key)
        if m:
            parts = [entries[QKV[1].format(i=m["i"], w=m["w"], part=p)] for p in QKV_PARTS]
            yield name, (lambda ps=parts: np.concatenate([f() for f, _ in ps], 0)), \
                sum(n for _, n in parts)
        else:
            yield name, fn, nbytes
    if mllm.config.tie_word_embeddings:
        fn, nbytes = entries["language_model.model.embed_tokens.weight"]
        yield "language_model.lm_head.weight", fn, nbytes
    if is_emit(model):
        for key, arr in hf.emit_tensors(model).items():
            yield EMIT_NAMES[key], (lambda a=arr: a), arr.nbytes
        yield NUM_BATCHES_TRACKED, (lambda: np.asarray(num_batches_tracked, np.int64)), 8


def save(model, out_dir: str | os.PathLike, *, base_config: dict | None = None,
         max_shard_size: int | str = "5GB", tokenizer_from: str | os.PathLike | None = None,
         num_batches_tracked: int = 0, log: Callable[[str], None] = print) -> str:
    """Write ``model`` as an internvl_chat folder the authors' ``CustomizedInternVLChatModel``
    (EMIT) or OpenGVLab's ``InternVLChatModel`` loads with no missing and no unexpected keys:
    safetensors shards, config.json, and the tokenizer from ``tokenizer_from`` with
    ``<COMP_CONTEXT>`` checked and the slow tokenizer's files (``vocab.json``, ``merges.txt``,
    ``added_tokens.json``) written when absent, since their code loads it with
    ``use_fast=False``. Refusals: :func:`check_exportable`."""
    for w in check_exportable(model):
        log(f"warning: {w}")
    mllm = model.mllm if is_emit(model) else model
    out_dir = where_written(out_dir)  # LINK/../NAME as the kernel reads it
    with atomic_folder(out_dir, hint="choose a new folder") as tmp:
        token_ids = {}
        has_tok = tokenizer_from is not None and os.path.isdir(tokenizer_from) and any(
            os.path.isfile(os.path.join(tokenizer_from, n))
            for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
        if has_tok:
            token_ids = write_tokenizer(tokenizer_from, tmp, model)
        elif is_emit(model):
            raise CheckpointError(f"{tokenizer_from}: no tokenizer to export; the authors' "
                                  "evaluation needs one with <COMP_CONTEXT>")
        else:
            log(f"warning: {tokenizer_from}: no tokenizer files; the folder holds the weights "
                "and config only")
            if tokenizer_from is not None and os.path.isdir(tokenizer_from):
                hf.copy_assets(tokenizer_from, tmp)  # generation / processor files, if any
        stream, dtype = hf.hf_tensor_stream(mllm)
        hf.write_safetensors(list(chat_tensors(model, num_batches_tracked=num_batches_tracked,
                                               stream=stream)), tmp, max_shard_size)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(chat_config(mllm.config, emit=is_emit(model), base=base_config,
                                  dtype=dtype, token_ids=token_ids), f, indent=2)
    return out_dir


_SLOW_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast", "PreTrainedTokenizerFast")


def write_tokenizer(src: str | os.PathLike, dst: str, model) -> dict[str, int]:
    """Copy the tokenizer files of ``src`` into ``dst`` and make them loadable by the authors'
    ``AutoTokenizer.from_pretrained(..., trust_remote_code=True, use_fast=False)`` (transformers
    4.x): ``vocab.json`` + ``merges.txt`` derived from a byte-level BPE ``tokenizer.json`` when
    absent, ``added_tokens.json`` and ``added_tokens_decoder`` listing every added token, and a
    ``tokenizer_class`` transformers 4 knows. Checks ``<IMG_CONTEXT>`` (and ``<COMP_CONTEXT>`` for
    EMIT) against the model. Returns the added tokens' ids."""
    from emit_jax.data.tokenizer import load_tokenizer

    src = os.fspath(src)
    hf.copy_assets(src, dst)
    emit = is_emit(model)
    tok = load_tokenizer(dst, require_comp=emit)
    mllm = model.mllm if emit else model
    img = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    if img != mllm.config.image_token_id:
        raise CheckpointError(f"{src}: the tokenizer's <IMG_CONTEXT> is id {img}, the model's "
                              f"image_token_id is {mllm.config.image_token_id}")
    if emit:
        comp = tok.convert_tokens_to_ids("<COMP_CONTEXT>")
        if comp != model.emit_config.comp_token_id:
            raise CheckpointError(f"{src}: the tokenizer's <COMP_CONTEXT> is id {comp}, the "
                                  f"model's comp_token_id is {model.emit_config.comp_token_id}")
    tj_path = os.path.join(dst, "tokenizer.json")
    tj = read_json(tj_path, error=CheckpointError, what="valid JSON") \
        if os.path.isfile(tj_path) else None
    byte_level = isinstance(tj, dict) and "ByteLevel" in json.dumps(tj.get("pre_tokenizer"))
    vocab_path, merges_path = os.path.join(dst, "vocab.json"), os.path.join(dst, "merges.txt")
    if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
        bpe = tj.get("model") if isinstance(tj, dict) else None
        if not (isinstance(bpe, dict) and bpe.get("type") == "BPE" and byte_level):
            raise CheckpointError(f"{src}: no vocab.json / merges.txt and no byte-level BPE "
                                  "tokenizer.json to derive them from (their evaluation loads "
                                  "the slow tokenizer)")
        with open(vocab_path, "w", encoding="utf-8") as f:
            json.dump(bpe["vocab"], f, ensure_ascii=False)
        with open(merges_path, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for m in bpe.get("merges") or []:
                f.write((" ".join(m) if isinstance(m, (list, tuple)) else m) + "\n")
    vocab = read_json(vocab_path, error=CheckpointError, what="valid JSON")
    added = {t: i for t, i in added_token_ids(dst).items() if t not in vocab}
    if isinstance(tj, dict):
        decoder = {str(t["id"]): {k: t.get(k, d) for k, d in (
            ("content", ""), ("lstrip", False), ("normalized", False), ("rstrip", False),
            ("single_word", False), ("special", True))} for t in tj.get("added_tokens") or []}
    else:
        decoder = {}
    added_path = os.path.join(dst, "added_tokens.json")
    if not os.path.isfile(added_path):
        with open(added_path, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(added.items(), key=lambda kv: kv[1])), f, indent=2,
                      ensure_ascii=False)
    tc_path = os.path.join(dst, "tokenizer_config.json")
    tc = read_json(tc_path, error=CheckpointError, what="valid JSON") \
        if os.path.isfile(tc_path) else {}
    if decoder and not tc.get("added_tokens_decoder"):
        tc["added_tokens_decoder"] = decoder
    if tc.get("tokenizer_class") not in _SLOW_CLASSES:
        tc["tokenizer_class"] = "Qwen2Tokenizer" if byte_level else "PreTrainedTokenizerFast"
    tc.pop("backend", None)
    with open(tc_path, "w", encoding="utf-8") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
    return added_token_ids(dst)


__all__ = ["load", "save", "read_config", "config_from_chat", "chat_config", "check_exportable",
           "chat_tensors", "to_hf_key", "to_chat_key", "added_token_ids", "emit_config_for",
           "write_tokenizer", "ChatReader"]
