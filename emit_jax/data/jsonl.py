"""EMIT's JSONL training files (ms-swift custom-dataset format, docs/reference/emit.md 9.1).

Stage 1 (SFT)::  {"id", "images": [reference, query], "messages": [{"role": "user", ...},
                  {"role": "assistant", "content": "B"}], <metadata>}
Stage 2 (GRPO):: {"id", "images": [...], "messages": [{"role": "user", ...}], "solution": "B",
                  <metadata>}

Metadata keys (forwarded to reward functions): ``task_type``, ``adlabel``, ``mask_path``,
``defect_location``, ``object_type``, ``anomaly_type``, ``chat_type``; we add ``options``.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Sequence

from emit_jax.data.mvtec import DataError, Report
from emit_jax.errors import show_path
from emit_jax.data.prompts import LETTERS, TASKS
from emit_jax.data.tasks import Question
from emit_jax.fileio import atomic_output, iter_json_lines


def question_to_record(q: Question, stage: int, idx: int) -> dict:
    rec = {"id": f"{q.meta.get('object_type', 'x')}-{idx:06d}", "images": list(q.images),
           "messages": [{"role": "user", "content": q.user}]}
    if stage == 1:
        rec["messages"].append({"role": "assistant", "content": q.answer})
    else:
        rec["solution"] = q.answer
    rec.update({k: v for k, v in q.meta.items()})
    rec["options"] = list(q.options)
    return rec


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Write atomically (temp file + rename); returns the number of records."""
    n = 0
    with atomic_output(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


class OutsideRootError(DataError):
    """An image path of a record that leaves the data root (:func:`resolve_inside`)."""


def resolve_inside(data_root: str | os.PathLike, path: str, where: str = "", *,
                   links: bool = False) -> str:
    """``data_root/path`` as an absolute path (``path`` relative to the root, or absolute); a
    path that leaves the root — by ``..``, by being absolute elsewhere, or through a symlink
    — raises :class:`OutsideRootError` (a :class:`DataError`) naming ``where`` and the path.
    ``links``: a symlink inside the root may point elsewhere (the dataset's own links, which
    its scan followed). Inside means where the path leads (a path written under the root's
    other spelling, through a link to it, is inside); with ``links`` a path written under
    either spelling of the root is inside too."""
    root = os.path.abspath(os.fspath(data_root))
    full = os.path.abspath(os.path.join(root, path))
    real_root, real = os.path.realpath(root), os.path.realpath(full)
    spelled = any(os.path.commonpath([r, full]) == r for r in {root, real_root})
    inside = os.path.commonpath([real_root, real]) == real_root
    if not (inside or (links and spelled)):
        raise OutsideRootError(f"{where + ': ' if where else ''}image path {path!r} resolves "
                               f"outside the data root {root}")
    return full


def _check(rec, where: str, data_root: str | None, links: bool = False) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{where}: 'messages' must be a list of JSON objects")
    if not msgs or msgs[0].get("role") != "user" or not isinstance(msgs[0].get("content"), str):
        raise DataError(f"{where}: 'messages' must start with a user turn")
    images = rec.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: 'images' must be a list of paths")
    for p in images:
        if "\x00" in p:
            raise DataError(f"{where}: image path {p!r} contains a NUL character")
    if msgs[0]["content"].count("<image>") != len(images):
        raise DataError(f"{where}: {msgs[0]['content'].count('<image>')} <image> tags but "
                        f"{len(images)} images")
    if data_root is not None:
        rec = dict(rec, images=[resolve_inside(data_root, p, f"{where}: record {rec.get('id')!r}",
                                               links=links) for p in images])
    task = rec.get("task_type")
    if task is not None and task not in TASKS:
        raise DataError(f"{where}: unknown task_type {task!r}")
    answer = rec.get("solution") or (msgs[1].get("content") if len(msgs) > 1 else None)
    options = rec.get("options")
    if answer is not None:
        n_opts = len(options) if isinstance(options, list) else 4
        if not isinstance(answer, str) or answer.strip() not in LETTERS[:n_opts]:
            raise DataError(f"{where}: answer {answer!r} is not one of the options "
                            f"{list(LETTERS[:n_opts])}")
    return rec


def read_jsonl(path: str | os.PathLike, *, data_root: str | None = None,
               report: Report | None = None, links: bool = False) -> Iterator[dict]:
    """Validated records; problems name the file and line (``report`` policy error/skip).
    With ``data_root`` image paths are resolved inside it, and one escaping it is an error
    (``links``: a symlink in the root pointing elsewhere is not: records a run built itself
    from the dataset's scan)."""
    path = os.fspath(path)
    report = report or Report()
    if not os.path.isfile(path):
        raise DataError(f"{show_path(path)}: no such file")
    seen: set[str] = set()
    # decoded line by line, so a bad byte or bad JSON names its line
    for lineno, obj, problem in iter_json_lines(path):
        where = f"{path}:{lineno}"
        if problem is not None:
            report.problem(f"{where}: {problem}")
            continue
        try:
            rec = _check(obj, where, data_root, links)
            rid = rec.get("id")
            if rid is not None:
                if isinstance(rid, (dict, list)):
                    raise DataError(f"{where}: 'id' must be a string, got "
                                    f"{type(rid).__name__}")
                if rid in seen:
                    raise DataError(f"{where}: duplicate id {rid!r}")
                seen.add(rid)
        except DataError as e:
            if report.policy == "error":
                raise  # as report.problem would, keeping its type (OutsideRootError)
            report.problem(str(e))
            continue
        yield rec


def records(questions: Sequence[Question], stage: int) -> list[dict]:
    return [question_to_record(q, stage, i) for i, q in enumerate(questions)]


def with_answers(records, answer) -> list[dict]:
    """``records`` with the assistant turn replaced by ``answer(record)`` (the user turn kept):
    templated answers for cross-entropy training."""
    return [dict(r, messages=[r["messages"][0], {"role": "assistant", "content": answer(r)}])
            for r in records]
