"""Model configuration for the InternVL family (InternViT + pixel shuffle + mlp1 + Qwen2).

The fields follow transformers' ``InternVLConfig`` / ``InternVLVisionConfig`` / ``Qwen2Config``
so a Hugging Face ``config.json`` maps onto them one to one (``from_hf_dict`` / ``to_hf_dict``).
Everything is a frozen dataclass: hashable, so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from emit_jax.errors import ConfigError
from emit_jax.fileio import not_a_file, read_json

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def dtype_from_name(name: str | Any | None):
    """'bfloat16' / 'float32' / a dtype / None -> jnp dtype or None."""
    if name is None:
        return None
    if isinstance(name, str):
        key = name.replace("torch.", "")
        if key not in _DTYPES:
            raise ConfigError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[key]
    return jnp.dtype(name).type


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


#: float fields whose other values make every activation NaN: RoPE's base and scaling factor,
#: the norms' epsilon (0 is taken, as transformers takes it)
_POSITIVE = frozenset({"rope_theta", "rope_factor"})
_NON_NEGATIVE = frozenset({"rms_norm_eps", "layer_norm_eps"})


def _check_types(cfg, what: str) -> None:
    """Each field of the dataclass ``cfg`` has its annotated type (a config.json with
    ``"hidden_size": "64"`` or ``null`` is one line naming the field, not a TypeError where it
    is used); the ``int`` sizes and counts are >= 1."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        kind = str(f.type).replace(" ", "")
        if v is None and kind.endswith("|None"):
            continue
        base = kind.split("|")[0]
        if base == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{what} {f.name} is {v!r}, expected a whole number")
            if v < 1:
                raise ConfigError(f"{what} {f.name} is {v}, expected a whole number >= 1")
        elif base == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v \
                    or v in (float("inf"), float("-inf")):
                raise ConfigError(f"{what} {f.name} is {v!r}, expected a finite number")
            # (eighteenth probe X17: rope_theta -1 converted and evaluated, every logit NaN)
            if f.name in _POSITIVE and v <= 0:
                raise ConfigError(f"{what} {f.name} is {v!r}, expected a number > 0")
            if f.name in _NON_NEGATIVE and v < 0:
                raise ConfigError(f"{what} {f.name} is {v!r}, expected a number >= 0")
        elif base == "bool":
            if not isinstance(v, bool):
                raise ConfigError(f"{what} {f.name} is {v!r}, expected true or false")
        elif base == "str":
            if not isinstance(v, str):
                raise ConfigError(f"{what} {f.name} is {v!r}, expected a string")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT. ``norm_type='layer_norm'``, ``use_qk_norm=False``, ``attention_bias=True`` is
    InternViT-300M-448px-V2.5; ``'rms_norm'`` + qk-norm + no qkv bias is InternViT-6B."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "layer_norm"  # or "rms_norm"
    use_qk_norm: bool = False
    attention_bias: bool = True
    layer_norm_eps: float = 1e-6
    layer_scale_init_value: float = 0.1
    use_mean_pooling: bool = True  # True: no final norm (InternVL3); False: final LayerNorm
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per side at the configured image size."""
        return self.image_size // self.patch_size

    def validate(self) -> None:
        _check_types(self, "vision")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ConfigError(f"vision norm_type {self.norm_type!r} is not 'layer_norm' or 'rms_norm'")
        if self.hidden_act != "gelu":
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported (only 'gelu')")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder (Qwen2.5 LLMs)."""

    vocab_size: int = 151674
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    # "default", or "dynamic" (dynamic NTK, InternVL3-1B's config): identical to "default" for
    # positions below max_position_embeddings, the only range this port supports.
    rope_type: str = "default"
    rope_factor: float | None = None

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        _check_types(self, "text")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}")
        if self.head_size % 2:
            raise ConfigError(f"text head dim {self.head_size} must be even for RoPE")
        if self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act {self.hidden_act!r} is not supported (only 'silu')")


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151667
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    tie_word_embeddings: bool = False
    # Numerics: parameters are stored in ``param_dtype``; matmuls run in ``dtype``.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Execution, not architecture (never in config.json): the decoder and ViT layers stacked and
    # run by one lax.scan each (emit_jax.models.scan); the same values and on-disk layouts.
    scan_layers: bool = False

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens one tile contributes after pixel shuffle (256 at 448 px)."""
        g = self.vision.grid
        r = int(round(1 / self.downsample_ratio))
        return (g // r) ** 2

    def validate(self) -> "InternVLConfig":
        self.vision.validate()
        self.text.validate()
        for name in ("image_token_id", "vision_feature_layer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} is {v!r}, expected a whole number")
        if isinstance(self.downsample_ratio, bool) or \
                not isinstance(self.downsample_ratio, (int, float)) or \
                not 0 < self.downsample_ratio <= 1:
            raise ConfigError(f"downsample_ratio is {self.downsample_ratio!r}, expected 1/n")
        r = 1 / self.downsample_ratio
        if abs(r - round(r)) > 1e-9 or self.vision.grid % round(r):
            raise ConfigError(
                f"downsample_ratio {self.downsample_ratio} must be 1/n with n dividing the patch grid "
                f"{self.vision.grid}")
        if self.projector_hidden_act != "gelu":
            raise ConfigError(f"projector_hidden_act {self.projector_hidden_act!r} is not supported")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} unsupported")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(
                f"image_token_id {self.image_token_id} is outside the vocabulary ({self.text.vocab_size})")
        dtype_from_name(self.param_dtype)
        dtype_from_name(self.dtype)
        return self

    def replace(self, **kw) -> "InternVLConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict, *, source: str = "config.json") -> "InternVLConfig":
        """Build from a transformers ``InternVLConfig`` dict (``model_type == 'internvl'``); a
        field of the wrong type is a :class:`ConfigError` naming ``source``."""
        try:
            return cls._from_hf_dict(d, source=source)
        except (TypeError, ValueError, AttributeError) as e:  # int("x"), float(None), "a".get
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: a field has the wrong type ({e})") from None

    @classmethod
    def _from_hf_dict(cls, d: dict, *, source: str) -> "InternVLConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        for key in ("vision_config", "text_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"{source}: {key} is {d[key]!r}, expected an object")
        mt = d.get("model_type")
        if mt != "internvl":
            hint = (" (the original 'internvl_chat' format: read it with emit_jax.hf.read_config / "
                    "emit_jax.internvl_chat, or python -m emit_jax.convert)"
                    if mt == "internvl_chat" else "")
            raise ConfigError(f"{source}: model_type is {mt!r}, expected 'internvl'{hint}")
        v = dict(d.get("vision_config") or {})
        t = dict(d.get("text_config") or {})
        if t.get("model_type", "qwen2") != "qwen2":
            raise ConfigError(f"{source}: text_config.model_type is {t.get('model_type')!r}; only 'qwen2' "
                              "(InternVL3 / Qwen2.5 language models) is supported")

        def one(x, name):
            if isinstance(x, (list, tuple)):
                if len(set(x)) != 1:
                    raise ConfigError(f"{source}: non-square vision_config.{name} {x} is not supported")
                return int(x[0])
            return int(x)

        vd = VisionConfig()
        vision = VisionConfig(
            hidden_size=v.get("hidden_size", vd.hidden_size),
            intermediate_size=v.get("intermediate_size", vd.intermediate_size),
            num_hidden_layers=v.get("num_hidden_layers", vd.num_hidden_layers),
            num_attention_heads=v.get("num_attention_heads", vd.num_attention_heads),
            image_size=one(v.get("image_size", vd.image_size), "image_size"),
            patch_size=one(v.get("patch_size", vd.patch_size), "patch_size"),
            num_channels=v.get("num_channels", 3),
            norm_type=v.get("norm_type", "layer_norm"),
            use_qk_norm=bool(v.get("use_qk_norm", False)),
            # transformers' default is False; the key is always written by save_pretrained.
            attention_bias=bool(v.get("attention_bias", False)),
            layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
            layer_scale_init_value=float(v.get("layer_scale_init_value", 0.1)),
            use_mean_pooling=bool(v.get("use_mean_pooling", True)),
            hidden_act=v.get("hidden_act", "gelu"),
        )
        if v.get("use_mask_token"):
            raise ConfigError(f"{source}: vision_config.use_mask_token=true is not supported")
        if not v.get("use_absolute_position_embeddings", True):
            raise ConfigError(f"{source}: vision_config.use_absolute_position_embeddings=false is unsupported")

        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "dynamic"):
            raise ConfigError(f"{source}: RoPE type {rope_type!r} is not supported "
                              "(only 'default', and 'dynamic' below max_position_embeddings)")
        theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
        if t.get("use_sliding_window"):
            raise ConfigError(f"{source}: text_config.use_sliding_window=true is not supported")
        td = TextConfig()
        text = TextConfig(
            vocab_size=t.get("vocab_size", 151936),
            hidden_size=t.get("hidden_size", 4096),
            intermediate_size=t.get("intermediate_size", 22016),
            num_hidden_layers=t.get("num_hidden_layers", 32),
            num_attention_heads=t.get("num_attention_heads", 32),
            num_key_value_heads=t.get("num_key_value_heads", t.get("num_attention_heads", 32)),
            head_dim=t.get("head_dim"),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=t.get("max_position_embeddings", td.max_position_embeddings),
            hidden_act=t.get("hidden_act", "silu"),
            rope_type=rope_type,
            rope_factor=float(rope["factor"]) if rope.get("factor") is not None else None,
        )
        layer = d.get("vision_feature_layer", -1)
        if isinstance(layer, (list, tuple)):
            raise ConfigError(f"{source}: a list vision_feature_layer {layer} is not supported")
        dtype = d.get("dtype") or d.get("torch_dtype") or t.get("dtype") or t.get("torch_dtype") or "float32"
        if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
            dtype = dtype.replace("torch.", "")
        elif dtype in ("auto", "float64"):  # float64: computed in float32, as before
            dtype = "float32"
        else:  # before: any other name ran as float32 without a word ("float8", a typo)
            raise ConfigError(f"{source}: dtype {dtype!r} is not one this port computes in "
                              f"({', '.join(_DTYPES)})")
        cfg = cls(
            vision=vision,
            text=text,
            image_token_id=d.get("image_token_id", 151667),
            downsample_ratio=float(d.get("downsample_ratio", 0.5)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            vision_feature_layer=int(layer),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            # transformers ties lm_head to the input embeddings iff the *top-level* flag is true
            # (default True), whatever text_config says.
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            param_dtype=dtype,
            dtype=dtype,
        )
        try:
            return cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self, base: dict | None = None) -> dict:
        """A transformers ``config.json`` dict. ``base`` (e.g. the source folder's config.json) keeps
        fields this port does not model (token ids, generation defaults, ...)."""
        d = json.loads(json.dumps(base)) if base else {}
        v, t = self.vision, self.text
        d.update({
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "downsample_ratio": self.downsample_ratio,
            "image_token_id": self.image_token_id,
            "image_seq_length": self.tokens_per_tile,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.param_dtype,
        })
        d.pop("torch_dtype", None)
        vc = dict(d.get("vision_config") or {})
        vc.update({
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size],
            "num_channels": v.num_channels,
            "norm_type": v.norm_type,
            "use_qk_norm": v.use_qk_norm,
            "attention_bias": v.attention_bias,
            "layer_norm_eps": v.layer_norm_eps,
            "layer_scale_init_value": v.layer_scale_init_value,
            "use_mean_pooling": v.use_mean_pooling,
            "hidden_act": v.hidden_act,
            "use_mask_token": False,
            "use_absolute_position_embeddings": True,
        })
        tc = dict(d.get("text_config") or {})
        for k in ("rope_theta", "rope_scaling", "torch_dtype"):
            tc.pop(k, None)
        tc.update({
            "model_type": "qwen2",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {"rope_type": t.rope_type, "rope_theta": t.rope_theta,
                                **({"factor": t.rope_factor} if t.rope_factor is not None else {})},
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
        })
        if t.head_dim is not None:
            tc["head_dim"] = t.head_dim
        d["vision_config"] = vc
        d["text_config"] = tc
        return d

    # ------------------------------------------------------------------ our own JSON
    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, d: dict) -> "InternVLConfig":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision"))
        text = TextConfig(**d.pop("text"))
        return cls(vision=vision, text=text, **d).validate()


def read_config_json(folder: str | os.PathLike) -> tuple[str, dict]:
    """``(path, raw dict)`` of ``folder/config.json``; a missing or malformed file raises
    ``ConfigError`` naming it."""
    path = os.path.join(os.fspath(folder), "config.json")
    if kind := not_a_file(path):  # before: "not found", for a pipe or a link loop there
        raise ConfigError(f"{path}: {kind}, not a config file")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found (expected a Hugging Face model folder)")
    raw = read_json(path, error=ConfigError, what="valid JSON")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return path, raw


def read_hf_config(hf_dir: str | os.PathLike) -> tuple[InternVLConfig, dict]:
    """(config, raw dict) from ``hf_dir/config.json``; errors name the file."""
    path, raw = read_config_json(hf_dir)
    return InternVLConfig.from_hf_dict(raw, source=path), raw
