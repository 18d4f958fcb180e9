"""Bytes per device of the stage's arrays and of what a program takes of them: which buffer a
state leaf is in a run (a reference array that is the policy's own is one buffer), arguments
passed twice, resident arrays a program does not read, the weights' shardings; and the
compiler's figures when it refuses a program for lack of HBM."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emit_jax.aot.programs import Program


def _itemsize(dtype) -> int:
    import numpy as np

    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # typed PRNG keys: their uint32 data
        import jax

        return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).size * 4 \
            if "key" in str(dtype) else 8


def _leaf_bytes(shape, dtype, sharding=None) -> int:
    """Bytes one device holds of an array (all of it without ``sharding``)."""
    shape = tuple(shape)
    return math.prod(sharding.shard_shape(shape) if sharding is not None else shape) * \
        _itemsize(dtype)


def _key(roles, path, shared) -> tuple:
    """The buffer a state leaf is in a run: ``(role, path)``; a reference array that is the
    policy's own is the policy's."""
    role = roles[path[0]]
    rest = tuple(path[1:])
    return ("policy", rest) if role == "reference" and rest in shared else (role, rest)


_UNITS = {"B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _size(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)\s*([KMGT]?)i?B?", text.strip())
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"]) if m else 0


def hbm_refusal(message: str) -> dict | None:
    """The compiler's figures from a RESOURCE_EXHAUSTED compile error, or None when the error
    is something else: ``required`` (what it counted, bytes) and ``available`` where it says."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    out: dict = {"message": " ".join(message.split())[:2000]}
    m = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", message)
    if m:
        out.update(required=_size(m.group(1)), available=_size(m.group(2)))
    m = re.search(r"required for ([\w ]+?) \(([\d.]+[KMGT]?)\) exceeds available HBM "
                  r"\(([\d.]+[KMGT]?)\)", message)
    if m:
        out.update(what=m.group(1), required=_size(m.group(2)), available=_size(m.group(3)))
    m = re.search(r"Exceeded hbm capacity by ([\d.]+[KMGT]?)", message)
    if m:
        out["exceeded"] = _size(m.group(1))
    return out


def _state_leaves(tree) -> list:
    """``[(nnx path, leaf)]`` of an abstract ``nnx.State`` in the order of ``jax.tree.leaves``."""
    import jax

    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append((tuple(getattr(k, "key", None) for k in kp
                          if isinstance(k, jax.tree_util.DictKey)), leaf))
    return out


def account(p: Program, abstract_args: tuple, shardings: tuple, resident: dict,
            shared: frozenset) -> dict:
    """What the executable takes of the stage's arrays, per device: ``dup`` bytes of arguments
    that are one buffer passed twice (the reference's weights that are the policy's, when both
    are used), ``missing`` bytes of resident arrays it does not take (not an argument, or one it
    never reads: XLA drops those), and the frozen argument's (the weights') sharding."""
    import jax

    seen: dict = {}
    read: set = set()  # weights (frozen arguments) the program reads
    dup = 0
    weights = {"arrays": 0, "used": 0, "sharded": 0, "whole": 0, "per_device": 0,
               "unused": 0, "unused_whole": 0, "unused_examples": [], "largest": None}
    for group, (tree, sh_tree) in enumerate(zip(abstract_args[:2], shardings[:2])):
        shs = jax.tree.leaves(sh_tree, is_leaf=lambda x: x is None)
        for (path, leaf), s in zip(_state_leaves(tree), shs):
            key = _key(p.roles, path, shared)
            whole = _leaf_bytes(leaf.shape, leaf.dtype)
            if group == 1:
                weights["arrays"] += 1
            if s is None:  # dropped by XLA: the program never reads it
                if group == 1:
                    weights["unused"] += 1
                    weights["unused_whole"] += whole
                    if len(weights["unused_examples"]) < 4:
                        weights["unused_examples"].append("/".join(map(str, path[1:])))
                continue
            b = _leaf_bytes(leaf.shape, leaf.dtype, s)
            if key in seen:
                dup += b
            seen[key] = b
            if group == 1:
                read.add(key)
            if group == 1:
                weights["used"] += 1
                weights["whole"] += whole
                weights["per_device"] += b
                weights["sharded"] += tuple(s.shard_shape(tuple(leaf.shape))) != tuple(leaf.shape)
                if weights["largest"] is None or whole > weights["largest"]["whole"]:
                    weights["largest"] = {"path": "/".join(map(str, path[1:])), "whole": whole,
                                          "shape": list(leaf.shape), "spec": str(s.spec),
                                          "per_device": b}
    missing = sum(b for k, b in resident.items() if k not in seen)
    # a program that reads the policy's own (not shared) weights but none of its LoRA factors,
    # both frozen arguments there (the sampler; the reference pass with mu > 1), runs the
    # policy without its adapters. (The train step takes the factors as trained state, which
    # its update reads whether the loss does or not.)
    lora = [k for k in resident
            if k[0] == "policy" and str(k[1][-1]).endswith(("_lora_a", "_lora_b"))]
    own = [k for k in resident if k[0] == "policy" and k not in lora and k[1] not in shared]
    reads_policy = any(k in read for k in own)
    weights["lora_factors"] = len(lora)
    weights["lora_read"] = sum(k in seen for k in lora)
    weights["lora_ignored"] = bool(lora) and reads_policy and not weights["lora_read"]
    return {"dup": dup, "missing": missing, "weights": weights}
