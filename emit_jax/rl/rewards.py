"""Verifiable rewards for EMIT stage 2 (difficulty-aware GRPO), docs/reference/emit.md §11.4.

Plain Python on decoded completion strings: no model, no JAX. Each reward reproduces the
ms-swift ORM class that EMIT's ``Stage2.sh`` selects (``--reward_funcs external_cls_acc_choice
external_cosine format repetition --reward_weights 3 1 1 1 --repetition_n_grams 4
--max_completion_length 512 --soft_cache_length 256``); the completion text is what the
sampler decoded, without the ``<|im_end|>`` stop token (§11.3).

==============  ========================  ======  =============================================
name            ms-swift ORM              weight  values / range
==============  ========================  ======  =============================================
``accuracy``    external_cls_acc_choice   3       {-1, 0, +1}: invalid / wrong / correct
``cosine``      external_cosine           1       correct [0.5, 1]; wrong [-0.5, 0]; invalid -1
                                                  -> [-1, 1]
``format``      format (``Format``)       1       {0, 1}
``repetition``  repetition                1       (-1, 0]  (documented as [-1, 0])
==============  ========================  ======  =============================================

Weighted total (§11.4) ``R = 3*r_acc + r_cos + r_fmt + r_rep``, documented range [-5, 5]
(``reward_range(DEFAULT_REWARDS, DEFAULT_WEIGHTS)``). The maximum 5 is reached by a correct,
well-formatted, repetition-free completion of <= 256 tokens; -5 is a bound, approached by an
invalid, malformed, maximally repetitive completion (the repetition penalty never reaches -1).

Summary of the rules (details and spec citations in each function's docstring):

* accuracy: the answer is the trimmed content of the *first* ``<answer>(.*?)</answer>`` match
  (no DOTALL), or the whole trimmed completion when there is none; answer and solution are
  normalised (strip, delete ' ', '_', '.', '\\n', lower-case); +1 if equal, else 0; then -1 if
  the normalised answer is not one of a/b/c/d (overrides +1/0).
* cosine: L = tokens of the completion (re-encoded by the tokenizer; the caller passes
  ``lengths``), t = max(0, L - 256), T = 512 - 256, value ``a_T + (a_0 - a_T)(1 + cos(pi t/T))/2``
  with (a_0, a_T) = (1.0, 0.5) for correct and (-0.5, 0.0) for wrong answers; -1 for invalid
  answers. t is not clipped at T (§15 #16).
* format: 1 iff ``re.match(r'^<think>.*?</think>\\s*<answer>.*?</answer>(?![\\s\\S])', c,
  re.DOTALL | re.MULTILINE)``; no leading or trailing whitespace allowed (§15 #15).
* repetition: lower-cased whitespace words, sliding 4-grams, ``-1.0 * (1 - #unique/#total)``;
  0 for an empty completion or fewer than 4 words.

Calling convention (TRL / ms-swift / Tunix style): every registered reward is
``fn(completions: list[str], *, solution: list[str], **kwargs) -> list[float]``, one value per
completion; ``kwargs`` carries per-completion lists from the dataset record (``task_type``,
``options``, AD-FM's ``answer`` / ``bbox_answer`` ...) and caller-computed extras (``lengths``).
A reward ignores keys it does not use. A value of ``None`` (TRL's "not applicable") becomes NaN
in ``combine``'s per-component arrays and is skipped by the weighted sum (``nansum``, as TRL and
ms-swift do).

Public API::

    REWARDS: dict[str, RewardFn]; REWARD_RANGES: dict[str, tuple[float, float]]
    register_reward(name, *, low=-inf, high=inf, aliases=(), overwrite=False) -> decorator
    unregister_reward(name) -> None;  get_reward(name) -> RewardFn
    reward_range(names, weights) -> (low, high)
    combine(names, weights, completions, **kwargs) -> (total [N], {name: [N]})
    DEFAULT_REWARDS, DEFAULT_WEIGHTS
    single completion: format_reward(c), accuracy_reward(c, s, valid_letters=None),
        cosine_reward(c, s, length, ...), cosine_from_accuracy(acc, length, ...),
        repetition_penalty(c, ngram_size=4, max_penalty=-1.0), is_correct(c, s, ...),
        extract_answer(c), normalize_answer(s), cosfn(t, T, min_value, max_value)
    batched (registered): accuracy_rewards, cosine_rewards, format_rewards, repetition_rewards
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

RewardFn = Callable[..., list]

# ------------------------------------------------------------------------------------------
# Constants (docs/reference/emit.md section in brackets)
# ------------------------------------------------------------------------------------------

#: §11.4(3): ms-swift ``Format`` pattern, used with ``re.match(..., re.DOTALL | re.MULTILINE)``.
#: ``(?![\s\S])`` = end of string, nothing after ``</answer>``, not even whitespace (§15 #15).
FORMAT_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])"
FORMAT_FLAGS = re.DOTALL | re.MULTILINE
_FORMAT_RE = re.compile(FORMAT_PATTERN, FORMAT_FLAGS)

#: §11.4(1) step 1: the *first* match, no DOTALL (the answer cannot span a newline, §15 #14).
ANSWER_PATTERN = r"<answer>(.*?)</answer>"
_ANSWER_RE = re.compile(ANSWER_PATTERN)

#: §11.4(1) step 2: characters deleted from answer and solution (after strip, before lower()).
ANSWER_DELETE_CHARS = (" ", "_", ".", "\n")

#: §11.4(1) step 4: the only valid normalised answers (E is not valid, even for MMAD's 5-option
#: questions; an AD question with only A/B still accepts C/D as *wrong*, §9.4).
VALID_LETTERS = ("a", "b", "c", "d")

#: §11.4(1): accuracy values.
ACC_CORRECT = 1.0
ACC_WRONG = 0.0
ACC_INVALID = -1.0

#: §11.4(2) / §13: cosine reward. ``COSINE_MAX_LEN`` = ms-swift ``cosine_max_len``, which
#: defaults to ``max_completion_length`` = 512; ``SOFT_CACHE_LENGTH`` = ``--soft_cache_length``.
COSINE_MAX_LEN = 512
SOFT_CACHE_LENGTH = 256
COSINE_MIN_LEN_VALUE_CORRECT = 1.0   # a_0 for correct answers (value at t = 0)
COSINE_MAX_LEN_VALUE_CORRECT = 0.5   # a_T for correct answers (value at t = T)
COSINE_MIN_LEN_VALUE_WRONG = -0.5    # a_0 for wrong but valid answers
COSINE_MAX_LEN_VALUE_WRONG = 0.0     # a_T for wrong but valid answers
COSINE_INVALID_VALUE = -1.0          # invalid answers (r_acc = -1)

#: §11.4(4) / §13: repetition penalty (``--repetition_n_grams 4``, ms-swift default -1.0).
REPETITION_NGRAM_SIZE = 4
REPETITION_MAX_PENALTY = -1.0

#: §11.4 / §13: the order in which the weight vector is applied, and the weights.
DEFAULT_REWARDS: tuple[str, ...] = ("accuracy", "cosine", "format", "repetition")
DEFAULT_WEIGHTS: tuple[float, ...] = (3.0, 1.0, 1.0, 1.0)

# ------------------------------------------------------------------------------------------
# Single-completion rewards
# ------------------------------------------------------------------------------------------


def format_reward(completion: str) -> float:
    """§11.4(3), ms-swift ``Format``: 1.0 iff the *whole* completion is
    ``<think>`` any text (across newlines) ``</think>`` optional whitespace ``<answer>`` any text
    ``</answer>`` and then the end of the string, else 0.0.

    Exactly ``re.match(FORMAT_PATTERN, completion, re.DOTALL | re.MULTILINE)``: anchored at the
    first character (leading whitespace fails), nothing after ``</answer>`` (a trailing newline
    fails, §15 #15). Tags are case-sensitive. Because ``.*?`` backtracks, nested or repeated tags
    still match as long as some split fits (``<think>a</think></think><answer>x</answer>`` -> 1).
    """
    return 1.0 if _FORMAT_RE.match(completion) else 0.0


def extract_answer(completion: str) -> str:
    """§11.4(1) step 1: trimmed content of the first ``<answer>(.*?)</answer>`` (no DOTALL),
    else the whole completion trimmed (not normalised; see ``normalize_answer``)."""
    m = _ANSWER_RE.search(completion)
    return m.group(1).strip() if m else completion.strip()


def normalize_answer(text: str) -> str:
    """§11.4(1) step 2: ``strip()``, delete ' ', '_', '.', '\\n', then ``lower()`` (the
    reference's exact chain: ``.strip().replace(' ','').replace('_','').replace('.','')
    .replace('\\n','').lower()``). Tabs and other whitespace inside the text are kept."""
    s = text.strip()
    for ch in ANSWER_DELETE_CHARS:
        s = s.replace(ch, "")
    return s.lower()


def _valid_set(valid_letters: Iterable[str] | None) -> tuple[str, ...]:
    if valid_letters is None:
        return VALID_LETTERS
    if isinstance(valid_letters, str):
        raise TypeError("valid_letters must be a sequence of letters, not a string")
    return tuple(normalize_answer(str(v)) for v in valid_letters)


def accuracy_reward(completion: str, solution: str,
                    valid_letters: Iterable[str] | None = None) -> float:
    """§11.4(1), EMIT's ``CLSAccuracyORM_choice`` (``external_cls_acc_choice``).

    a = ``normalize_answer(extract_answer(completion))``, s = ``normalize_answer(solution)``;
    r = +1 if a == s else 0; then r = -1 if a is not a valid letter (overrides, so a solution
    "E" answered "E" scores -1). ``valid_letters=None`` is the faithful {a, b, c, d};
    pass e.g. ``("A", "B")`` to make C/D invalid for two-option questions (not EMIT's behaviour).
    ``solution=None`` is treated as "" (never correct). Values: {-1.0, 0.0, 1.0}.
    """
    a = normalize_answer(extract_answer(completion))
    s = normalize_answer("" if solution is None else str(solution))
    r = ACC_CORRECT if a == s else ACC_WRONG
    if a not in _valid_set(valid_letters):
        r = ACC_INVALID
    return r


def is_correct(completion: str, solution: str,
               valid_letters: Iterable[str] | None = None) -> bool:
    """"Correct" for difficulty-aware resampling and reweighting (§11.5, §11.6): the accuracy
    reward is +1. Wrong (0) and invalid (-1) answers are both not correct."""
    return accuracy_reward(completion, solution, valid_letters) == ACC_CORRECT


def cosfn(t: float, T: float, min_value: float, max_value: float) -> float:
    """ms-swift ``CosineReward.cosfn``: ``max_value - (max_value - min_value)(1 - cos(pi t/T))/2``,
    i.e. ``max_value`` at t = 0 and ``min_value`` at t = T (§11.4(2): a_0 = max_value,
    a_T = min_value, equal to ``a_T + (a_0 - a_T)(1 + cos(pi t/T))/2``)."""
    return max_value - (max_value - min_value) * (1 - math.cos(t * math.pi / T)) / 2


def cosine_from_accuracy(acc: float, length: int, *,
                         max_len: int = COSINE_MAX_LEN,
                         soft_cache_length: int = SOFT_CACHE_LENGTH,
                         min_len_value_correct: float = COSINE_MIN_LEN_VALUE_CORRECT,
                         max_len_value_correct: float = COSINE_MAX_LEN_VALUE_CORRECT,
                         min_len_value_wrong: float = COSINE_MIN_LEN_VALUE_WRONG,
                         max_len_value_wrong: float = COSINE_MAX_LEN_VALUE_WRONG,
                         invalid_value: float = COSINE_INVALID_VALUE) -> float:
    """§11.4(2), EMIT's modified ``CosineReward`` given the accuracy reward ``acc``.

    ``length`` = L, the completion's token count; t = max(0, L - soft_cache_length),
    T = max_len - soft_cache_length (256). acc = +1: cosfn(t, T, a_T=0.5, a_0=1.0);
    acc = 0: cosfn(t, T, a_T=0.0, a_0=-0.5); acc = -1: -1.0. t is *not* clipped at T
    (§15 #16: past L = 512 the curve comes back up), but cos is bounded, so the value stays in
    [0.5, 1] (correct) / [-0.5, 0] (wrong) for every integer ``length`` (negative or beyond float
    range included). Any other ``acc`` raises ValueError, as the reference does.
    """
    T = max(0, max_len - soft_cache_length)
    if T <= 0:
        raise ValueError(f"cosine reward needs max_len > soft_cache_length, got {max_len}, "
                         f"{soft_cache_length}")
    if acc == ACC_CORRECT:
        lo, hi = max_len_value_correct, min_len_value_correct   # swap: shorter is better
    elif acc == ACC_WRONG:
        lo, hi = max_len_value_wrong, min_len_value_wrong       # longer is better
    elif acc == ACC_INVALID:
        return float(invalid_value)
    else:
        raise ValueError(f"invalid accuracy reward {acc!r}")
    t = max(0, int(length) - soft_cache_length)
    # cos(pi t / T) has period 2T in t: reducing t first keeps a huge length (an int beyond
    # float range) finite instead of raising OverflowError; the value is unchanged.
    return float(cosfn(t % (2 * T), T, lo, hi))


def cosine_reward(completion: str, solution: str, length: int, *,
                  valid_letters: Iterable[str] | None = None, **constants: Any) -> float:
    """§11.4(2): ``cosine_from_accuracy(accuracy_reward(completion, solution), length)``.

    ``length`` must be the number of tokens of ``completion`` as the policy's tokenizer
    re-encodes it (the reference calls ``len(tokenizer.encode(content))``; Qwen2 adds no BOS), not
    characters. ``constants`` override the §13 values (see ``cosine_from_accuracy``)."""
    return cosine_from_accuracy(accuracy_reward(completion, solution, valid_letters), length,
                                **constants)


def repetition_penalty(completion: str, ngram_size: int = REPETITION_NGRAM_SIZE,
                       max_penalty: float = REPETITION_MAX_PENALTY) -> float:
    """§11.4(4), ms-swift ``RepetitionPenalty`` with n = 4, max penalty -1.0.

    0.0 for "" or fewer than ``ngram_size`` whitespace words (``str.split()``, Unicode
    whitespace). Otherwise the words of ``completion.lower().split()`` form sliding n-grams
    (#total = #words - n + 1) and the value is ``max_penalty * (1 - #unique / #total)``, in
    ``(max_penalty, 0]``. Example: "a b c d a b c d" -> 5 four-grams, 4 unique -> -0.2.
    """
    if completion == "" or len(completion.split()) < ngram_size:
        return 0.0
    words = completion.lower().split()
    grams = list(zip(*[words[i:] for i in range(ngram_size)]))
    if not grams:  # unreachable unless lower() changed the word count; keep it finite
        return 0.0
    return (1 - len(set(grams)) / len(grams)) * max_penalty


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------

REWARDS: dict[str, RewardFn] = {}
REWARD_RANGES: dict[str, tuple[float, float]] = {}


def register_reward(name: str, *, low: float = -math.inf, high: float = math.inf,
                    aliases: Sequence[str] = (), overwrite: bool = False):
    """Decorator registering ``fn(completions, *, solution, **kwargs) -> list[float]`` under
    ``name`` (and ``aliases``), with its documented range [low, high] (used by
    ``reward_range``). Re-registering a name raises unless ``overwrite=True``. Works for plain
    functions and for callable objects (``register_reward("x")(MyORM(...))``).

    An AD-FM-style reward, for example, reads its own record fields from ``kwargs``::

        @register_reward("anomaly_loc", low=-0.1, high=1.0)
        def anomaly_loc(completions, *, solution=None, answer, bbox_answer, **kwargs): ...
    """
    if not (low <= high):
        raise ValueError(f"reward {name!r}: low {low} > high {high}")

    def deco(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"reward {name!r} is not callable")
        for n in (name, *aliases):
            if n in REWARDS and not overwrite and REWARDS[n] is not fn:
                raise ValueError(f"reward {n!r} is already registered (overwrite=True replaces)")
        for n in (name, *aliases):
            REWARDS[n] = fn
            REWARD_RANGES[n] = (float(low), float(high))
        return fn

    return deco


def unregister_reward(name: str) -> None:
    """Remove ``name`` (only that key, not its aliases) from the registry."""
    REWARDS.pop(name, None)
    REWARD_RANGES.pop(name, None)


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}") from None


def reward_range(names: Sequence[str] = DEFAULT_REWARDS,
                 weights: Sequence[float] = DEFAULT_WEIGHTS) -> tuple[float, float]:
    """Bounds of ``sum_k w_k r_k`` from the registered ranges (a negative weight swaps its
    component's bounds). ``reward_range()`` = (-5.0, 5.0), §11.4."""
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} reward names but {len(weights)} weights")
    lo = hi = 0.0
    for n, w in zip(names, weights):
        get_reward(n)
        a, b = REWARD_RANGES[n]
        w = float(w)
        if w == 0:
            continue
        lo += min(w * a, w * b)
        hi += max(w * a, w * b)
    return lo, hi


def _per_sample(name: str, values: Any, n: int) -> list:
    if values is None:
        raise ValueError(f"{name} is required")
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a list with one entry per completion, not a string")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} completions")
    return values


def _valid_letters_list(valid_letters: Any, n: int) -> list:
    if valid_letters is None:
        return [None] * n
    return _per_sample("valid_letters", valid_letters, n)


@register_reward("accuracy", low=-1.0, high=1.0, aliases=("external_cls_acc_choice",))
def accuracy_rewards(completions: Sequence[str], *, solution: Sequence[str],
                     valid_letters: Sequence[Sequence[str] | None] | None = None,
                     **kwargs: Any) -> list[float]:
    """Batched ``accuracy_reward`` (§11.4(1)); values in {-1, 0, 1}. ``valid_letters`` (optional,
    one letter list or None per completion) restricts the valid letters; the dataset's
    ``options`` field is deliberately ignored (EMIT always accepts a-d)."""
    n = len(completions)
    sols = _per_sample("solution", solution, n)
    vls = _valid_letters_list(valid_letters, n)
    return [accuracy_reward(c, s, v) for c, s, v in zip(completions, sols, vls)]


def _lengths(completions: Sequence[str], lengths: Any, length_fn: Any, tokenizer: Any) -> list:
    n = len(completions)
    if lengths is not None:
        return [int(x) for x in _per_sample("lengths", lengths, n)]
    if length_fn is not None:
        return [int(length_fn(c)) for c in completions]
    if tokenizer is not None:
        return [len(tokenizer.encode(c)) for c in completions]
    raise ValueError("the cosine reward needs token lengths: pass lengths=[...] (tokens of each "
                     "completion), length_fn=callable(str) -> int, or tokenizer= (uses "
                     "len(tokenizer.encode(text)), as the reference does)")


@register_reward("cosine", low=-1.0, high=1.0, aliases=("external_cosine",))
def cosine_rewards(completions: Sequence[str], *, solution: Sequence[str],
                   lengths: Sequence[int] | None = None,
                   length_fn: Callable[[str], int] | None = None, tokenizer: Any = None,
                   valid_letters: Sequence[Sequence[str] | None] | None = None,
                   **kwargs: Any) -> list[float]:
    """Batched ``cosine_reward`` (§11.4(2)); values in [-1, 1].

    Token length of each completion, first of: ``lengths`` (computed by the caller; the spec's L
    is the count of the *re-encoded* decoded text, without the ``<|im_end|>`` stop token),
    ``length_fn(text)``, ``len(tokenizer.encode(text))``; none of them -> ValueError."""
    n = len(completions)
    sols = _per_sample("solution", solution, n)
    lens = _lengths(completions, lengths, length_fn, tokenizer)
    vls = _valid_letters_list(valid_letters, n)
    return [cosine_from_accuracy(accuracy_reward(c, s, v), L)
            for c, s, v, L in zip(completions, sols, vls, lens)]


@register_reward("format", low=0.0, high=1.0)
def format_rewards(completions: Sequence[str], **kwargs: Any) -> list[float]:
    """Batched ``format_reward`` (§11.4(3)); values in {0, 1}. ``solution`` is not used."""
    return [format_reward(c) for c in completions]


@register_reward("repetition", low=REPETITION_MAX_PENALTY, high=0.0)
def repetition_rewards(completions: Sequence[str], **kwargs: Any) -> list[float]:
    """Batched ``repetition_penalty`` (§11.4(4)); values in (-1, 0]. ``solution`` is not used."""
    return [repetition_penalty(c) for c in completions]


def combine(names: Sequence[str], weights: Sequence[float], completions: Sequence[str],
            **kwargs: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Evaluate the rewards ``names`` on ``completions`` and weight them (§11.4).

    Every reward is called as ``fn(completions, **kwargs)`` (``solution=`` and any record fields
    go in ``kwargs``). Returns ``(total, per_component)``: ``per_component[name]`` is the
    unweighted float64 array [N] (None -> NaN), ``total`` [N] is ``nansum_k w_k r_k`` (TRL /
    ms-swift semantics). With the defaults the total lies in ``reward_range()`` = [-5, 5].
    """
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} reward names but {len(weights)} weights")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate reward names in {list(names)}")
    if isinstance(completions, (str, bytes)):
        raise TypeError("completions must be a list of strings, not a string")
    completions = list(completions)
    n = len(completions)
    per: dict[str, np.ndarray] = {}
    for name in names:
        out = get_reward(name)(completions, **kwargs)
        vals = np.array([np.nan if v is None else float(v) for v in out], dtype=np.float64)
        if vals.shape != (n,):
            raise ValueError(f"reward {name!r} returned {vals.shape[0]} values for {n} "
                             "completions")
        per[name] = vals
    if n == 0 or not names:
        return np.zeros(n, np.float64), per
    stacked = np.stack([per[k] for k in names], axis=1)                    # [N, K]
    w = np.asarray(weights, dtype=np.float64)[None, :]                     # [1, K]
    total = np.nansum(stacked * w, axis=1)
    return total, per


__all__ = [
    "RewardFn", "REWARDS", "REWARD_RANGES", "DEFAULT_REWARDS", "DEFAULT_WEIGHTS",
    "register_reward", "unregister_reward", "get_reward", "reward_range", "combine",
    "format_reward", "accuracy_reward", "cosine_reward", "cosine_from_accuracy", "cosfn",
    "repetition_penalty", "is_correct", "extract_answer", "normalize_answer",
    "accuracy_rewards", "cosine_rewards", "format_rewards", "repetition_rewards",
    "FORMAT_PATTERN", "FORMAT_FLAGS", "ANSWER_PATTERN", "ANSWER_DELETE_CHARS", "VALID_LETTERS",
    "ACC_CORRECT", "ACC_WRONG", "ACC_INVALID", "COSINE_MAX_LEN", "SOFT_CACHE_LENGTH",
    "COSINE_MIN_LEN_VALUE_CORRECT", "COSINE_MAX_LEN_VALUE_CORRECT", "COSINE_MIN_LEN_VALUE_WRONG",
    "COSINE_MAX_LEN_VALUE_WRONG", "COSINE_INVALID_VALUE", "REPETITION_NGRAM_SIZE",
    "REPETITION_MAX_PENALTY",
]
