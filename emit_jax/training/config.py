"""Typed, validated settings of the training stages, built once from the ConfigDict.

:class:`OptimConfig` (an SFT-type stage: warmup, base, sft, sft2; also GRPO's schedule),
:class:`LoRAConfig` and :class:`GRPOConfig` check themselves when built (``__post_init__``): a bad
value is one :class:`ConfigError` line naming the config key, e.g.
``config grpo.G: 1 is below 2 (GRPO compares G >= 2 completions per prompt)``.
``X.from_section(cfg.grpo)`` reads an ``ml_collections`` section (missing optional keys take
the defaults below); everything downstream (the stages, ``make_grpo_fns``, the benchmarks, the
memory plan) takes these objects, not the raw ConfigDict.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from emit_jax.errors import ConfigError
from emit_jax.limits import INT_MAX, MAX_BATCH, MAX_REWARD_WEIGHT, MAX_TOKENS
from emit_jax.parallel.mesh import SAMPLER_MESHES
from emit_jax.rl import grpo as rl_grpo
from emit_jax.rl import rewards as rl_rewards

#: every stage a config may list, in the order a run goes through them
STAGES = ("warmup", "base", "sft", "sft2", "grpo")
#: the stages trained by cross-entropy (an :class:`OptimConfig` section each)
SFT_STAGES = ("warmup", "base", "sft", "sft2")
#: the stages with LoRA adapters (``grpo.lora``)
LORA_STAGES = ("sft2", "grpo")
#: the stages that train an EMIT model (soft prompt, projector, ``<COMP_CONTEXT>``)
EMIT_STAGES = ("sft", "sft2", "grpo")
#: what "correct" may mean for resampling and reweighting (``grpo.correct``)
CORRECTNESS = ("accuracy", "adfm_cls")
#: when the rollout samples a copy with the LoRA updates merged (``grpo.sampler.merge_lora``)
MERGE_LORA = ("float32", "always", "never")
#: how a resampling round pads its prompts (``grpo.sampler.resample_pad``)
RESAMPLE_PADS = ("pow2", "full")


# ------------------------------------------------------------------------------ checks
def fail(key: str, value, problem: str):
    raise ConfigError(f"config {key}: {value!r} {problem}")


#: the quantization types qwix names (besides 1-byte dtypes: int8, int4, float8_e4m3fn, ...)
QLORA_NAMED_QTYPES = ("nf4", "int2", "int3", "int5", "int6", "int7", "mxfp8", "mxfp4", "nvfp4")


def _known_qtype(qtype) -> bool:
    """Whether qwix can quantize to ``qtype`` (its ``numerics.get_symmetric_bound`` rule): a
    named type, or an integer or floating dtype of at most one byte."""
    if not isinstance(qtype, str):
        return False
    if qtype in QLORA_NAMED_QTYPES:
        return True
    import jax.numpy as jnp  # noqa: PLC0415 - only for a QLoRA config

    try:
        dt = jnp.dtype(qtype)
    except TypeError:
        return False
    return dt.itemsize <= 1 and (jnp.issubdtype(dt, jnp.integer) or
                                 jnp.issubdtype(dt, jnp.floating))




def check_int(key: str, v, *, low: int | None = None, high: int = INT_MAX) -> int:
    """An integer (not a bool) in ``[low, high]``."""
    if isinstance(v, bool) or not isinstance(v, int):
        fail(key, v, "is not an integer")
    if low is not None and v < low:
        fail(key, v, f"is below {low}")
    if high is not None and v > high:
        fail(key, v, f"is above {high}")
    return v


def check_float(key: str, v, *, low: float | None = None, low_open: bool = False,
                high: float | None = None, high_open: bool = False) -> float:
    """A finite number in ``[low, high]`` (``low_open`` / ``high_open``: the bound excluded)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        fail(key, v, "is not a number")
    if not math.isfinite(v):
        fail(key, v, "is not a finite number")
    if low is not None and (v < low or (low_open and v == low)):
        fail(key, v, f"must be {'>' if low_open else '>='} {low}")
    if high is not None and (v > high or (high_open and v == high)):
        fail(key, v, f"must be {'<' if high_open else '<='} {high}")
    return float(v)


#: the largest float32: a learning rate above it is infinite in the update (1e39 trained a NaN
#: model with exit 0, its first step counted finite)
F32_MAX = 3.4028234663852886e38


def check_lr(key: str, v) -> float:
    """A learning rate: a finite number above 0 that float32 holds."""
    lr = check_float(key, v, low=0.0, low_open=True)
    if lr > F32_MAX:
        fail(key, v, "is infinite in float32, the precision of the update (the largest float32 "
             "is 3.4e38)")
    return lr


def check_lora_rank(rank: int, widths: dict[str, tuple[int, int]]) -> None:
    """Raise ``ConfigError`` when ``rank`` is above ``min(in, out)`` of every adapted kernel
    (``widths``: its path -> ``(in, out)``): no kernel can use it (one changes in at most
    ``min(in, out)`` directions) and its factors outweigh the layers. ``train`` (where the
    adapters are made) and ``plan`` say it alike."""
    if not widths:
        return
    name, (d_in, d_out) = max(widths.items(), key=lambda kv: min(kv[1]))
    if int(rank) > min(d_in, d_out):
        raise ConfigError(f"config grpo.lora.rank: {rank} is above every adapted layer's width "
                          f"(the widest, {name}, is {d_in} x {d_out}): a kernel changes in at most "
                          f"min(in, out) directions, so choose a rank of at most "
                          f"{min(d_in, d_out)} (low-rank adapters are usually 4-64)")


def check_micro(key: str, mb: int, rows: int, what: str) -> None:
    """``micro_batch_size``: 0 (the whole batch) or a divisor of the step's rows."""
    check_int(key, mb, low=0)
    if 0 < mb < rows and rows % mb:
        fail(key, mb, f"does not divide {what} ({rows} rows)")


def _fields(cls, section: Mapping[str, Any], name: str, required=()) -> dict:
    """The dataclass fields ``cls`` takes from ``section`` (missing: the default; missing and
    in ``required``: an error)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "name" or not f.init:
            continue
        if f.name in section:
            out[f.name] = section[f.name]
        elif f.name in required:
            raise ConfigError(f"config {name}.{f.name}: missing")
    return out


# ------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up + cosine decay, global-norm clipping (``training.optim``), and the
    batch of an SFT-type stage. ``name``: the config section, for messages."""
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
    # the language model's parameters' learning rate is lr x this (its updates scaled; 1 = one
    # rate for all): a stage that trains the LLM beside a new part (sft.train_llm) can move the
    # LLM slower than the projector
    llm_lr_scale: float = 1.0
    name: str = dataclasses.field(default="optim", compare=False)

    def __post_init__(self):
        n = self.name
        check_int(f"{n}.steps", self.steps, low=1)
        check_int(f"{n}.batch_size", self.batch_size, low=1)
        check_lr(f"{n}.lr", self.lr)
        check_float(f"{n}.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        # decoupled decay: lr x weight_decay of every weight per step; past 1 it is a typo
        check_float(f"{n}.weight_decay", self.weight_decay, low=0.0, high=1.0)
        check_float(f"{n}.b1", self.b1, low=0.0, high=1.0, high_open=True)
        check_float(f"{n}.b2", self.b2, low=0.0, high=1.0, high_open=True)
        check_float(f"{n}.eps", self.eps, low=0.0, low_open=True)
        check_float(f"{n}.clip_norm", self.clip_norm, low=0.0, low_open=True)
        check_micro(f"{n}.micro_batch_size", self.micro_batch_size, self.batch_size,
                    f"{n}.batch_size")
        check_float(f"{n}.llm_lr_scale", self.llm_lr_scale, low=0.0, high=1.0)

    @classmethod
    def from_section(cls, section: Mapping[str, Any], name: str) -> "OptimConfig":
        return cls(**_fields(cls, section, name, required=("steps", "batch_size", "lr")), name=name)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """qwix LoRA on the modules whose path matches ``targets`` (a regex); ``weight_qtype``
    (``nf4``, ``int8``, ...) makes it QLoRA; "" keeps the base kernels as they are."""
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = ".*"
    weight_qtype: str = ""

    def __post_init__(self):
        check_int("grpo.lora.rank", self.rank, low=1)
        check_float("grpo.lora.alpha", self.alpha, low=0.0, low_open=True)
        check_float("grpo.lora.dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if not isinstance(self.targets, str) or not self.targets:
            fail("grpo.lora.targets", self.targets, "must be a regular expression matching the "
                 "paths of the linear layers to adapt")
        try:
            re.compile(self.targets)
        except re.error as e:  # used to be a traceback when the LoRA stage began
            fail("grpo.lora.targets", self.targets, f"is not a regular expression ({e})")
        if self.weight_qtype and not _known_qtype(self.weight_qtype):
            fail("grpo.lora.weight_qtype", self.weight_qtype, "is not a quantization type qwix "
                 f"knows: {', '.join(QLORA_NAMED_QTYPES)} or a 1-byte dtype (int8, "
                 "float8_e4m3fn, ...); '' for plain LoRA")

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "LoRAConfig":
        return cls(**_fields(cls, section, "grpo.lora", required=("rank", "alpha")))


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How GRPO's rollout samples (``grpo.sampler``; docs/training.md, "the sampler").

    ``merge_lora``: ``float32`` samples, once per step, from a copy with the LoRA updates merged
    into the kernels when they are float32 (the policy's values up to float rounding) and from
    the unmerged policy otherwise; ``always`` merges bfloat16 / float16 kernels too (the update
    rounded into them, as vLLM-based trainers sample); ``never`` samples the unmerged policy.
    QLoRA (``lora.weight_qtype``) always samples unmerged. ``mesh``: ``learner`` (the learner's
    mesh: with FSDP, the TPU compiler all-gathers the weights in every decode step),
    ``replicated`` (every device a full copy, the prompts over all devices) or ``tensor``
    (weights over heads / MLP / vocabulary on the learner's fsdp x tensor devices, prompts over
    data); the weights are moved once per step. ``resample_pad``: a resampling round pads its
    failed prompts to the next power of two (``pow2``, at most ``prompts_per_step``) or to
    ``prompts_per_step`` (``full``)."""
    merge_lora: str = "float32"
    mesh: str = "learner"
    resample_pad: str = "pow2"

    def __post_init__(self):
        for key, allowed in (("merge_lora", MERGE_LORA), ("mesh", SAMPLER_MESHES),
                             ("resample_pad", RESAMPLE_PADS)):
            if getattr(self, key) not in allowed:
                fail(f"grpo.sampler.{key}", getattr(self, key), f"must be one of {allowed}")

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "SamplerConfig":
        return cls(**_fields(cls, section, "grpo.sampler"))


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """EMIT stage 2 (``training.grpo``): ``prompts_per_step`` prompts x ``G`` completions a
    step, rewards, difficulty-aware resampling and weights, the clipped loss with KL, LoRA."""
    steps: int = 40
    prompts_per_step: int = 2
    G: int = 4
    max_new_tokens: int = 40
    micro_batch_size: int = 0  # completions per micro-batch of the loss (0 = all at once)
    iterations: int = 1  # mu: optimiser updates per sampled batch
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    beta: float = rl_grpo.BETA
    eps_low: float = rl_grpo.EPS_LOW
    eps_high: float = rl_grpo.EPS_HIGH
    kl: str = rl_grpo.KL_ESTIMATOR
    agg: str = rl_grpo.LOSS_AGG
    resample: bool = True
    max_resample_times: int = rl_grpo.MAX_RESAMPLE_TIMES
    reweight: bool = True
    bn: str = "train"  # the heat-map BatchNorm in the loss: "train" or "frozen"
    reward_names: tuple = ("accuracy", "cosine", "format", "repetition")
    reward_weights: tuple = (3.0, 1.0, 1.0, 1.0)
    reward_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    correct: str = "accuracy"  # what "correct" means: CORRECTNESS
    records: str = "grpo"  # "grpo" (EMIT's four tasks) or "adfm"
    # how the rollouts are asked: "think" (EMIT: the think instruction, <think>/<answer>
    # completions) or "direct" (the direct instruction the held-out evaluation asks with)
    instruction: str = "think"
    lr: float = 5e-4
    warmup_ratio: float = 0.01
    weight_decay: float = 0.1
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)

    def __post_init__(self):
        check_int("grpo.steps", self.steps, low=1)
        check_int("grpo.prompts_per_step", self.prompts_per_step, low=1)
        check_int("grpo.G", self.G, high=MAX_BATCH)  # (1e8 ran warm-up, base and sft first)
        if self.G < 2:
            fail("grpo.G", self.G, "is below 2 (GRPO compares G >= 2 completions per prompt)")
        check_int("grpo.iterations", self.iterations, low=1)
        check_micro("grpo.micro_batch_size", self.micro_batch_size, self.rows,
                    "grpo.prompts_per_step x grpo.G")
        check_int("grpo.prompts_per_step x grpo.G", self.rows)  # completions per step
        check_int("grpo.steps x grpo.iterations", self.steps * self.iterations)  # optax's count
        check_int("grpo.max_new_tokens", self.max_new_tokens, low=1, high=MAX_TOKENS)
        check_float("grpo.temperature", self.temperature, low=0.0, low_open=True)
        check_int("grpo.top_k", self.top_k, low=0)
        check_float("grpo.top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        check_float("grpo.beta", self.beta, low=0.0)
        # the ratio is clipped below at 1 - eps_low: 1 or more clips nothing, or below zero
        check_float("grpo.eps_low", self.eps_low, low=0.0, high=1.0, high_open=True)
        check_float("grpo.eps_high", self.eps_high, low=0.0)
        check_int("grpo.max_resample_times", self.max_resample_times, low=0)
        check_lr("grpo.lr", self.lr)
        check_float("grpo.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        check_float("grpo.weight_decay", self.weight_decay, low=0.0, high=1.0)
        for key, canon in (("kl", rl_grpo.canon_kl), ("agg", rl_grpo.canon_agg)):
            try:
                canon(getattr(self, key))
            except ValueError as e:
                raise ConfigError(f"config grpo.{key}: {e}") from None
        names, weights = tuple(self.reward_names), tuple(self.reward_weights)
        unknown = [n for n in names if n not in rl_rewards.REWARDS]
        if unknown:
            fail("grpo.reward_names", names, f"names unknown reward(s) {unknown}; "
                 f"registered: {sorted(rl_rewards.REWARDS)}")
        if not names:  # (all-zero weights were refused; no reward at all was accepted)
            fail("grpo.reward_names", names, "is empty: no reward, so no advantage and nothing "
                 "to learn")
        if len(set(names)) != len(names):
            fail("grpo.reward_names", names, "repeats a reward")
        if len(weights) != len(names):
            fail("grpo.reward_weights", weights, f"has {len(weights)} entries for "
                 f"{len(names)} reward_names")
        for i, w in enumerate(weights):
            # bounded: the weighted sum of G rewards stays finite (1e308 made it -inf)
            check_float(f"grpo.reward_weights[{i}]", w, low=-MAX_REWARD_WEIGHT,
                        high=MAX_REWARD_WEIGHT)
        if weights and not any(weights):  # every completion scored alike: no advantage
            fail("grpo.reward_weights", weights, "are all zero: every completion would get the "
                 "same reward, so no advantage and nothing to learn")
        if self.correct not in CORRECTNESS:
            fail("grpo.correct", self.correct, "must be 'accuracy' or 'adfm_cls'")
        if self.bn not in ("train", "frozen"):
            fail("grpo.bn", self.bn, "must be 'train' or 'frozen'")
        if self.instruction not in ("think", "direct"):
            fail("grpo.instruction", self.instruction, "must be 'think' or 'direct'")
        if self.records not in ("grpo", "adfm"):
            fail("grpo.records", self.records, "must be 'grpo' (EMIT's four tasks) or 'adfm'")
        object.__setattr__(self, "reward_names", names)
        object.__setattr__(self, "reward_weights", tuple(float(w) for w in weights))
        object.__setattr__(self, "reward_kwargs", dict(self.reward_kwargs))

    @property
    def rows(self) -> int:
        """Completions per step: ``prompts_per_step x G``."""
        return self.prompts_per_step * self.G

    def optim(self) -> OptimConfig:
        """The optimiser's settings; its schedule counts updates: ``iterations`` per step."""
        return OptimConfig(steps=self.steps * self.iterations, lr=self.lr,
                           warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay,
                           b1=0.9, b2=0.95, clip_norm=1.0, name="grpo")

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "GRPOConfig":
        if "lora" not in section:
            raise ConfigError("config grpo.lora: missing")
        kw = _fields(cls, section, "grpo", required=(
            "steps", "prompts_per_step", "G", "max_new_tokens", "temperature", "top_k", "top_p",
            "beta", "eps_low", "eps_high", "kl", "agg", "max_resample_times", "lr",
            "warmup_ratio", "weight_decay", "reward_names", "reward_weights"))
        kw["lora"] = LoRAConfig.from_section(section["lora"])
        kw["sampler"] = SamplerConfig.from_section(section.get("sampler") or {})
        return cls(**kw)
