"""The training recipes (one module per recipe, each with ``get_config(arg=None)``) and the one
loader every command uses (``emit_jax.train``, ``emit_jax.plan``, ``emit_jax.aot``,
``emit_jax.experiments.table1``).

A config is named as ``emit_jax.train --config`` takes it: a file ``path/to/cfg.py`` or a packaged
recipe's name (``grpo``), optionally with ``:arg`` (``configs/grpo.py:smoke``), passed to
``get_config``. Overrides are ``key.sub=value`` (``--config.key.sub=value`` on a command line):
the value is read as a Python literal (``3``, ``1e-3``, ``False``, ``('sft',)``) unless the field
holds a string, and must keep the field's type. Every failure is one :class:`ConfigError` line.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections

from emit_jax.errors import ConfigError
from emit_jax.fileio import user_path

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def resolve(spec: str) -> tuple[str, str | None]:
    """``"configs/grpo.py:smoke"`` / ``"grpo:smoke"`` -> (file path, arg or None)."""
    path, colon, arg = spec.partition(":")
    path = user_path(path)  # '--config=~/my.py' (the shell leaves a ~ after =)
    if not spec.strip():
        raise ConfigError("config: empty; name a config file, e.g. configs/grpo.py:smoke")
    if not path:  # before: "not found: .../configs/.py", a path the user never named
        raise ConfigError(f"config {spec!r}: no config file before the ':'; e.g. "
                          "configs/grpo.py:smoke")
    if colon and not arg:  # before: taken as no variant, the whole recipe
        raise ConfigError(f"config {spec!r}: nothing after the ':'; name a variant (e.g. "
                          f"{path}:smoke) or leave the ':' out")
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError(f"config file {path}: a symbolic link to nothing (or a link loop)")
    if not path.endswith(".py") and os.path.isfile(path):
        raise ConfigError(f"config file {path}: not a Python file (.py) with get_config(); "
                          "e.g. configs/grpo.py")
    if not path.endswith(".py") and os.sep not in path and "/" not in path:
        path = os.path.join(PACKAGE_DIR, path + ".py")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path}: is a folder; name a config file such as "
                          "configs/grpo.py")
    if os.path.exists(path) and not os.path.isfile(path):  # before: "not found" of a pipe
        from emit_jax.fileio import not_a_file

        raise ConfigError(f"config file {path}: not a regular file ({not_a_file(path)}); name "
                          "a config file such as configs/grpo.py")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if not path.endswith(".py"):
        raise ConfigError(f"config file {path}: not a Python file (.py) with get_config(); "
                          "e.g. configs/grpo.py")
    return path, (arg or None)


def load(spec: str, overrides: Sequence[str] | Mapping[str, Any] = (), *,
         lock: bool = True) -> ml_collections.ConfigDict:
    """The config ``spec`` names, with ``overrides`` applied (``["key=value", ...]`` or
    ``{"key": value}``, see :func:`apply`); locked: no new keys."""
    path, arg = resolve(spec)
    name = "_emit_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):  # before: AttributeError naming an internal module
            raise ConfigError("defines no get_config() (a recipe is a Python file whose "
                              "get_config(arg=None) returns its ConfigDict)")
        cfg = get_config(arg) if arg is not None else get_config()
    except ConfigError as e:  # the recipe's own check, e.g. an unknown variant
        raise ConfigError(f"config {spec}: {e}") from None
    except SystemExit as e:  # before: exit 0 and no output at all (or the bare message)
        raise ConfigError(f"config file {path} failed to load: it called sys.exit"
                          f"({'' if e.code is None else repr(e.code)})") from None
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is bad input
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned {type(cfg).__name__}, "
                          "expected an ml_collections.ConfigDict")
    if lock:
        cfg.lock()
    return expand_home(apply(cfg, overrides))


#: the settings that name a file or folder: a leading ``~`` means the home folder, as a shell
#: would read it (the shell leaves ``--config.data.source=~/data`` as it is: ``~`` only
#: expands at a word's start)
PATH_KEYS = ("data.source", "init_from", "tokenizer")


def expand_home(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg`` with a leading ``~`` of each :data:`PATH_KEYS` setting expanded (before:
    "'~/data' is not a folder" for the README's own form)."""
    for key in PATH_KEYS:
        node, *rest = key.split(".")
        section = cfg
        for part in [node] + rest[:-1] if rest else []:
            section = section.get(part) if isinstance(section, ml_collections.ConfigDict) else None
        leaf = rest[-1] if rest else node
        if isinstance(section, ml_collections.ConfigDict) and isinstance(section.get(leaf), str):
            try:
                path = user_path(section[leaf])
            except ConfigError as e:
                raise ConfigError(f"config {key}: {e}") from None
            if path != section[leaf]:
                with section.unlocked():
                    section[leaf] = path
    return cfg


def apply(cfg: ml_collections.ConfigDict, overrides: Sequence[str] | Mapping[str, Any]):
    """``cfg`` with overrides set in place: ``"key.sub=value"`` strings, or a mapping
    ``{"key.sub": value}`` whose string values are read like a command line's and other values
    set as they are."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items, seen = [], {}
        for key, raw in (_split(item) for item in overrides):
            if key in seen and seen[key] != raw:  # the last would win without a word
                raise ConfigError(f"config {key}: given twice, as {seen[key]!r} and {raw!r}")
            seen[key] = raw
            items.append((key, raw))
    for key, value in items:
        set_field(cfg, key, value)
    return cfg


def parse_sets(items: Sequence[str] | None) -> dict[str, str]:
    """``["grpo.G=4", ...]`` (``--set`` arguments) -> ``{"grpo.G": "4"}`` (read by :func:`apply`).
    A key given twice with different values is refused (before: the last won without a word)."""
    out: dict[str, str] = {}
    for key, raw in (_split(item) for item in items or ()):
        if out.setdefault(key, raw) != raw:
            raise ConfigError(f"--set {key}: given twice, as {out[key]!r} and {raw!r}")
    return out


def _split(item: str) -> tuple[str, str]:
    key, eq, raw = item.partition("=")
    if not eq or not key:
        raise ConfigError(f"{item!r}: expected KEY=VALUE")
    return key, raw


_FLOAT_NAMES = {"nan": float("nan"), "inf": float("inf"), "infinity": float("inf")}


def _with_float_names(raw: str):
    """``raw`` parsed as a Python expression, with the bare names nan / inf / infinity (any
    case) read as floats, so ``(1.0,nan)`` reaches the field's own range check (which names
    the entry) rather than failing as "not a tuple"; a string ``raw`` when it is no
    expression (``ast.literal_eval`` then refuses it)."""
    try:
        tree = ast.parse(raw.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return raw

    class _Floats(ast.NodeTransformer):
        def visit_Name(self, node):
            value = _FLOAT_NAMES.get(node.id.lower())
            return node if value is None else ast.copy_location(ast.Constant(value), node)

    return _Floats().visit(tree)


#: a bare word, or words split by commas: ``grpo``, ``base,sft`` (names, paths, no quotes)
_WORDS = re.compile(r"\s*[\w.\-/~]+(\s*,\s*[\w.\-/~]+)*\s*,?\s*")


def _parse(raw: str, current):
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(_with_float_names(raw))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        words = raw.strip()
        if words.startswith("(") and words.endswith(")"):  # (accuracy,format): eighteenth
            words = words[1:-1]                           # probe K7, refused as "no tuple"
        if (isinstance(current, tuple) and all(isinstance(c, str) for c in current)
                and _WORDS.fullmatch(words)):  # a tuple of names spelled bare: stages=grpo
            return tuple(w.strip() for w in words.split(",") if w.strip())
        return raw
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, tuple) and isinstance(value, str):
        return (value,)
    return value


def set_field(cfg: ml_collections.ConfigDict, key: str, value) -> None:
    """Set ``key`` (dotted) of ``cfg`` to ``value`` (a string is read as :func:`load` says)."""
    node = cfg
    *parents, last = key.split(".")
    try:
        for p in parents:
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict) or last not in node:
            raise KeyError(last)
    except (KeyError, TypeError):
        raise ConfigError(f"config {key}: no such field") from None
    current = node[last]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config {key}: a section; set its fields ({key}.NAME=...)")
    parsed = _parse(value, current) if isinstance(value, str) else value
    if isinstance(current, bool) and parsed is None:  # ml_collections lets None into any field
        raise ConfigError(f"config {key}={value}: expected a bool value (True or False)")
    try:  # a locked config refuses new keys only: an existing field can be set
        node[last] = parsed
    except (TypeError, ValueError):  # ml_collections keeps a field's type
        kind = type(current).__name__
        raise ConfigError(f"config {key}={value}: expected {'an' if kind[0] in 'aeiou' else 'a'} "
                          f"{kind} value (like {current!r})") from None


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--config.key=value`` / ``--config.key value`` -> ``key=value`` overrides; the rest of
    ``argv`` as it was."""
    rest, overrides = [], []
    it = iter(argv)
    for a in it:
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq:
                value = next(it, None)
                if value is None:
                    raise ConfigError(f"{a}: expected --config.{key}=VALUE")
            overrides.append(f"{key}={value}")
        else:
            rest.append(a)
    return rest, overrides
