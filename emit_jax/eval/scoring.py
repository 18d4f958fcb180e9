"""MMAD answer parsing, scoring and the results table (docs/reference/mmad.md 6-7, 9; docs/reference/emit.md 12.3-12.4).

Pure Python, model-free.

* :func:`parse_answer` turns a model response into an option letter as EMIT's
  ``evaluate_batch_mmad_choice.py`` does: in think mode the content of the *last*
  ``<answer>...</answer>`` (else the whole response), then the *first* standalone capital
  ``A``-``E``; failing that, the option whose text is closest to the response (difflib, cutoff 0).
  :func:`parse_response` picks between that (``parse="emit"``) and MMAD's own query scripts'
  rule (``parse="mmad"``: the *last* letter, no ``<answer>`` extraction).
* :func:`summarize` reproduces ``summary.py``: Object Structure / Details merged into Object
  Analysis; per (sub-dataset, task) accuracy in percent; Anomaly Detection replaced by balanced
  accuracy over normal (path contains ``good``) and anomalous images; a row ``Average`` = the
  unweighted mean of that row's task columns; a bottom ``Average`` row = the unweighted mean over
  sub-datasets (the headline MMAD score is its ``Average``). Three policies for answers that are
  not a letter A-E: ``"emit"`` (bug-compatible removal, which also skips the entry after each
  removed one), ``"drop"`` (removal without that bug) and ``"wrong"`` (count them as wrong).
* :func:`format_table` prints the paper's Table 1 layout; :func:`write_answers_json` /
  :func:`read_answers_json` handle the per-question answers file MMAD's own ``summary.py``
  reads; :func:`write_accuracy_csv` writes the ``*_accuracy.csv`` EMIT writes.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

from emit_jax.data.mmad import (PAPER_TASK_NAMES, SUB_DATASETS, TASKS, is_normal_image,
                                paper_task_name, task_of)
from emit_jax.fileio import atomic_output, read_json

VALID_LETTERS = ("A", "B", "C", "D", "E")
_LETTER_RE = re.compile(r"\b([A-E])\b")
_ANSWER_TAG_RE = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.DOTALL)
ANSWER_FIELDS = ("image", "question", "question_type", "correct_answer", "gpt_answer")

InvalidPolicy = Literal["emit", "drop", "wrong"]
ParseMode = Literal["emit", "mmad"]
#: The answer parsers of :func:`parse_response` (``python -m emit_jax.evaluate --parse``).
PARSE_MODES: tuple[str, ...] = ("emit", "mmad")
GroupBy = Literal["sub_dataset", "class"]


# ------------------------------------------------------------------------------------ parsing
def extract_answer_span(response: str) -> str:
    """Think mode: the stripped content of the last ``<answer>...</answer>`` (whitespace allowed
    inside the tag brackets, content may span lines), else the whole stripped response."""
    found = _ANSWER_TAG_RE.findall(response)
    return found[-1].strip() if found else response.strip()


def parse_answer(text: str, options: Mapping[str, str] | None = None, *, think: bool = False,
                 pick: Literal["first", "last"] = "first",
                 fallback: Literal["fuzzy", "none"] = "fuzzy") -> str | None:
    """The option letter a response chose, or ``None``.

    1. ``think``: keep only :func:`extract_answer_span`; otherwise the stripped response
       (EMIT's ``batch_chat`` strips it).
    2. The first (``pick="last"``: MMAD's GPT/InternVL/Qwen scripts) standalone capital ``A``-``E``
       (regex ``\\b([A-E])\\b``; lower-case letters never count; the letter need not be an option).
    3. None found, ``fallback="fuzzy"`` (EMIT): with options, the letter of the option text
       closest to the response (``difflib.get_close_matches(..., n=1, cutoff=0.0)``, so a
       non-empty option set always yields a letter); without options, the first character
       upper-cased if it is ``A``-``E`` else ``"A"``. An empty response without options (where
       EMIT would crash) gives ``None``. ``fallback="none"``: ``None`` (the strict variant).
    """
    s = extract_answer_span(text) if think else text.strip()
    letters = _LETTER_RE.findall(s)
    if letters:
        return letters[0] if pick == "first" else letters[-1]
    if fallback == "none":
        return None
    if fallback != "fuzzy":
        raise ValueError(f"fallback must be 'fuzzy' or 'none', got {fallback!r}")
    if options is None:
        if not s:
            return None
        c = s[0].upper()
        return c if c in VALID_LETTERS else "A"
    values = list(options.values())
    match = difflib.get_close_matches(s, values, n=1, cutoff=0.0)
    if not match:
        return None
    for key, value in options.items():
        if value == match[0]:
            return key
    return None  # unreachable: the match is one of the values


def lettered(text: str, options: Sequence[str] | None) -> str:
    """``text`` (a think completion) with the content of its last ``<answer>...</answer>``
    replaced by the letter :func:`parse_answer` reads from it (EMIT's parser: the first standalone
    ``A``-``E``, else the option whose text is closest): how a completion that answers with the
    option's words (``data.answers='words'``) is rewarded by EMIT's letter rewards, as the
    evaluation scores it. Without an answer tag, options, or a letter read, ``text`` as is."""
    found = list(_ANSWER_TAG_RE.finditer(text))
    if not found or not options:
        return text
    span = found[-1]
    letter = parse_answer(span.group(1), dict(zip(VALID_LETTERS, options)))
    if letter is None:
        return text
    return text[:span.start()] + f"<answer>{letter}</answer>" + text[span.end():]


def parse_response(text: str, options: Mapping[str, str] | None = None, *,
                   parse: ParseMode = "emit", think: bool = False) -> str | None:
    """The option letter of a response under one paper's parsing (docs/reference/mmad.md 6).

    * ``"emit"`` (EMIT's ``evaluate_batch_mmad_choice.py``): :func:`parse_answer` as is -- with
      ``think``, the last ``<answer>...</answer>`` first; then the *first* standalone ``A``-``E``;
      else the closest option text.
    * ``"mmad"`` (MMAD's GPT / InternVL / Qwen / Gemini query scripts, ``GPT4Query.parse_answer``
      then ``[-1]``): the *last* standalone ``A``-``E`` of the whole response -- no ``<answer>``
      extraction even with ``think`` (those scripts have no think mode) -- else, as MMAD's helper
      does when given the options, the closest option text (difflib, cutoff 0). (MMAD's InternVL
      script passes no options and would stop on a response without a letter; its Qwen2.5-VL
      script keeps the raw text, which the summary then drops as invalid.)
    """
    if parse == "emit":
        return parse_answer(text, options, think=think)
    if parse == "mmad":
        return parse_answer(text, options, think=False, pick="last")
    raise ValueError(f"parse must be one of {', '.join(PARSE_MODES)}, got {parse!r}")


# ------------------------------------------------------------------------------------ scoring
def _valid(letter: Any) -> bool:
    return isinstance(letter, str) and letter in VALID_LETTERS


def _group_key(image: str, by: GroupBy) -> str:
    parts = image.split("/")
    if by == "sub_dataset":
        return parts[0]
    if by == "class":
        return "/".join(parts[:2])
    raise ValueError(f"by must be 'sub_dataset' or 'class', got {by!r}")


@dataclass(frozen=True)
class CellStats:
    """Scored questions of one (group, task) cell."""

    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        """Percent; 0 for an empty cell (as ``summary.py``)."""
        return 100.0 * self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class DetectionStats:
    """Anomaly Detection split by ``'good' in path`` (anomalous = positive class)."""

    normal_correct: int = 0
    normal_total: int = 0
    anomaly_correct: int = 0
    anomaly_total: int = 0

    @property
    def normal_acc(self) -> float:
        """Fraction (EMIT's ``normal_acc`` column); 0 when there are no normal images."""
        return self.normal_correct / self.normal_total if self.normal_total else 0.0

    @property
    def anomaly_acc(self) -> float:
        """Fraction (EMIT's ``anomaly_acc`` column); 0 when there are no anomalous images."""
        return self.anomaly_correct / self.anomaly_total if self.anomaly_total else 0.0

    @property
    def balanced_accuracy(self) -> float:
        """Percent: (normal_acc + anomaly_acc) / 2 * 100, an empty side counting 0 (as EMIT)."""
        return (self.normal_acc + self.anomaly_acc) / 2 * 100

    @property
    def recall(self) -> float:
        return 100.0 * self.anomaly_acc

    @property
    def precision(self) -> float:
        tp = self.anomaly_correct
        fp = self.normal_total - self.normal_correct
        return 100.0 * tp / (tp + fp) if tp + fp else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def overkill(self) -> float:
        return 100.0 * (1 - self.normal_acc)

    @property
    def miss(self) -> float:
        return 100.0 * (1 - self.anomaly_acc)


@dataclass(frozen=True)
class Summary:
    """Scores of one answers list.

    ``tasks``: column keys present in the data (``summary.py`` labels, MMAD order first; paper
    names via :func:`emit_jax.data.mmad.paper_task_name`). ``groups``: row keys (sub-datasets in
    MMAD order, then others in order of appearance; ``Dataset/class`` with ``by="class"``).
    ``accuracy[group][task]`` is a percent (AD = balanced accuracy) and
    ``accuracy[group]["Average"]`` the mean of the row's task columns; ``average`` is the bottom
    row (mean over groups of every column, ``"Average"`` included). ``n_rows`` entries were read,
    ``n_scored`` counted; ``n_invalid`` had a letter outside A-E; ``n_dropped`` were removed as
    invalid and ``n_skipped`` were skipped by the ``"emit"`` removal bug (valid or not)."""

    tasks: tuple[str, ...]
    groups: tuple[str, ...]
    cells: Mapping[str, Mapping[str, CellStats]]
    detection: Mapping[str, DetectionStats]
    accuracy: Mapping[str, Mapping[str, float]]
    average: Mapping[str, float]
    invalid: str
    by: str
    n_rows: int
    n_scored: int
    n_invalid: int
    n_dropped: int
    n_skipped: int

    @property
    def score(self) -> float:
        """The headline number: bottom-row Average (mean over groups of the mean over tasks)."""
        return self.average["Average"]

    def task_counts(self) -> dict[str, int]:
        """Scored questions per task, over all groups."""
        return {t: sum(self.cells[g][t].total for g in self.groups) for t in self.tasks}

    def group_counts(self) -> dict[str, int]:
        """Scored questions per group, over all tasks."""
        return {g: sum(self.cells[g][t].total for t in self.tasks) for g in self.groups}


def _emit_kept(rows: list[dict]) -> tuple[list[int], int, int]:
    """Replays ``summary.py``'s loop, which calls ``list.remove`` on the list it iterates: the entry
    after each removed one is never visited. Returns (indices of the counted rows, removed,
    skipped)."""
    tagged = [(i, r) for i, r in enumerate(rows)]
    work = list(tagged)
    visited, kept, removed = set(), [], 0
    for item in work:  # noqa: B007 - mutating while iterating is the point
        i, r = item
        visited.add(i)
        if not (_valid(r.get("correct_answer")) and _valid(r.get("gpt_answer"))):
            # list.remove drops the first *equal* element, as in the original (dict equality)
            for j, (_, other) in enumerate(work):
                if other == r:
                    del work[j]
                    break
            removed += 1
            continue
        kept.append(i)
    return kept, removed, len(rows) - len(visited)


def summarize(rows: Iterable[Mapping[str, Any]], *, invalid: InvalidPolicy = "emit",
              by: GroupBy = "sub_dataset", normal_flag: str = "good") -> Summary:
    """Score answers-file rows (:data:`ANSWER_FIELDS`) as ``summary.py`` does.

    Rows and columns come from *all* rows (before invalid ones are removed), so a cell can be
    empty: it scores 0 and still enters the row Average, as in the original. ``invalid``:
    ``"emit"`` removes rows whose ``gpt_answer`` or ``correct_answer`` is not A-E together with
    the row right after each removed one (the original's mutate-while-iterating bug; exact for
    comparing with EMIT's numbers); ``"drop"`` removes only the invalid rows; ``"wrong"`` keeps
    every row and counts an invalid one as wrong. ``by="class"`` gives ``summary_finer.py``'s
    ``Dataset/class`` rows."""
    rows = [dict(r) for r in rows]
    for k, r in enumerate(rows):
        missing = [f for f in ("image", "question_type", "correct_answer", "gpt_answer") if f not in r]
        if missing:
            raise ValueError(f"answer row {k}: missing field(s) {missing}")
        not_str = [f for f in ("image", "question_type") if not isinstance(r[f], str)]
        if not_str:
            raise ValueError(f"answer row {k}: field(s) {not_str} must be strings")
    groups_seen: list[str] = []
    tasks_seen: list[str] = []
    for r in rows:
        g, t = _group_key(r["image"], by), task_of(r["question_type"])
        if g not in groups_seen:
            groups_seen.append(g)
        if t not in tasks_seen:
            tasks_seen.append(t)
    tasks = tuple([t for t in TASKS if t in tasks_seen] + [t for t in tasks_seen if t not in TASKS])
    top = {name: i for i, name in enumerate(SUB_DATASETS)}
    groups = tuple(sorted(groups_seen, key=lambda g: (top.get(g.split("/")[0], len(top)),
                                                      groups_seen.index(g))))

    n_invalid = sum(not (_valid(r["correct_answer"]) and _valid(r["gpt_answer"])) for r in rows)
    if invalid == "emit":
        kept, n_dropped, n_skipped = _emit_kept(rows)
    elif invalid == "drop":
        kept = [i for i, r in enumerate(rows)
                if _valid(r["correct_answer"]) and _valid(r["gpt_answer"])]
        n_dropped, n_skipped = len(rows) - len(kept), 0
    elif invalid == "wrong":
        kept, n_dropped, n_skipped = list(range(len(rows))), 0, 0
    else:
        raise ValueError(f"invalid must be 'emit', 'drop' or 'wrong', got {invalid!r}")

    cell = {g: {t: [0, 0] for t in tasks} for g in groups}
    det = {g: [0, 0, 0, 0] for g in groups}  # normal correct/total, anomaly correct/total
    for i in kept:
        r = rows[i]
        g, t = _group_key(r["image"], by), task_of(r["question_type"])
        ok = _valid(r["correct_answer"]) and r["gpt_answer"] == r["correct_answer"]
        cell[g][t][0] += ok
        cell[g][t][1] += 1
        if t == "Anomaly Detection":
            off = 0 if is_normal_image(r["image"], normal_flag) else 2
            det[g][off] += ok
            det[g][off + 1] += 1

    cells = {g: {t: CellStats(*cell[g][t]) for t in tasks} for g in groups}
    detection = {g: DetectionStats(*det[g]) for g in groups}
    accuracy: dict[str, dict[str, float]] = {}
    for g in groups:
        acc = {t: cells[g][t].accuracy for t in tasks}
        if "Anomaly Detection" in acc:
            acc["Anomaly Detection"] = detection[g].balanced_accuracy
        acc["Average"] = math.fsum(acc.values()) / len(tasks) if tasks else 0.0
        accuracy[g] = acc
    columns = list(tasks) + ["Average"]
    average = {c: (math.fsum(accuracy[g][c] for g in groups) / len(groups) if groups else 0.0)
               for c in columns}
    return Summary(tasks=tasks, groups=groups, cells=cells, detection=detection, accuracy=accuracy,
                   average=average, invalid=invalid, by=by, n_rows=len(rows), n_scored=len(kept),
                   n_invalid=n_invalid, n_dropped=n_dropped, n_skipped=n_skipped)


# ------------------------------------------------------------------------------------ output
def format_table(summary: Summary, *, digits: int = 1, paper_names: bool = True,
                 title: str | None = None) -> str:
    """The paper's Table 1 layout as an aligned, Markdown-compatible table: one row per group and
    a bottom ``Average`` row; one column per task present (MMAD order; paper names unless
    ``paper_names=False``), then ``Average`` and ``Questions`` (scored questions in the row). A
    last ``Questions`` row gives the per-task counts. A cell without questions prints ``-``
    (it still counts 0 in the Average, as in ``summary.py``)."""
    names = [paper_task_name(t) if paper_names else t for t in summary.tasks]
    header = ["Dataset" if summary.by == "sub_dataset" else "Class"] + names + ["Average", "Questions"]
    fmt = f"{{:.{digits}f}}"
    group_n = summary.group_counts()
    body: list[list[str]] = []
    empty = False
    for g in summary.groups:
        row = [g]
        for t in summary.tasks:
            if summary.cells[g][t].total == 0:
                row.append("-")
                empty = True
            else:
                row.append(fmt.format(summary.accuracy[g][t]))
        body.append(row + [fmt.format(summary.accuracy[g]["Average"]), str(group_n[g])])
    body.append(["Average"] + [fmt.format(summary.average[t]) for t in summary.tasks]
                + [fmt.format(summary.average["Average"]), ""])
    task_n = summary.task_counts()
    body.append(["Questions"] + [str(task_n[t]) for t in summary.tasks] + ["", str(sum(task_n.values()))])
    widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(out) + " |"

    lines = [] if title is None else [title]
    lines += [line(header), "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":"
                                           for i, w in enumerate(widths)) + "|"]
    lines += [line(r) for r in body]
    # "invalid-answer policy" (twentieth probe C74: "policy 'emit'" read as the parse mode)
    notes = [f"{summary.n_scored} of {summary.n_rows} questions scored (invalid answers: "
             f"{summary.n_invalid}, invalid-answer policy {summary.invalid!r}: "
             f"{summary.n_dropped} dropped, {summary.n_skipped} skipped)"]
    if "Anomaly Detection" in summary.tasks:
        ad = PAPER_TASK_NAMES["Anomaly Detection"] if paper_names else "Anomaly Detection"
        notes.append(f"{ad} is balanced accuracy over normal and anomalous images")
    if empty:
        notes.append("'-': no questions; the cell counts 0 in the Average, as in summary.py")
    return "\n".join(lines + notes)


def write_answers_json(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write the answers file (a JSON list, one element per question: ``image``, ``question``
    ``{"type": "text", "text": ...}``, ``question_type``, ``options``, ``correct_answer``,
    ``gpt_answer``, plus any extra fields) atomically: a temporary file in the same folder, then
    ``os.replace``. A parse failure is written as ``null``, which MMAD's summary drops."""
    rows = [dict(r) for r in rows]
    for k, r in enumerate(rows):
        missing = [f for f in ANSWER_FIELDS if f not in r]
        if missing:
            raise ValueError(f"answer row {k}: missing field(s) {missing}")
    with atomic_output(path) as f:
        f.write(json.dumps(rows, indent=4, ensure_ascii=False) + "\n")


def read_answers_json(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read an answers file (ours, EMIT's or MMAD's); a malformed one raises ``ValueError`` naming
    the file (and the element)."""
    path = os.fspath(path)
    rows = read_json(path, error=ValueError)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: must be a JSON list of answers, got {type(rows).__name__}")
    for k, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: element {k}: must be an object, got {type(r).__name__}")
        missing = [f for f in ("image", "question_type", "correct_answer", "gpt_answer") if f not in r]
        if missing:
            raise ValueError(f"{path}: element {k}: missing field(s) {missing}")
        not_str = [f for f in ("image", "question_type") if not isinstance(r[f], str)]
        if not_str:
            raise ValueError(f"{path}: element {k}: field(s) {not_str} must be strings")
    return rows


def write_accuracy_csv(path: str | os.PathLike, summary: Summary) -> None:
    """EMIT's ``<answers>_accuracy.csv`` (atomic): an empty index header, the task columns with
    ``summary.py`` labels, ``Average``, then ``normal_acc`` / ``anomaly_acc`` (fractions) when
    Anomaly Detection is present; one row per group and a bottom ``Average`` row."""
    ad = "Anomaly Detection" in summary.tasks
    cols = list(summary.tasks) + ["Average"] + (["normal_acc", "anomaly_acc"] if ad else [])

    def esc(s: str) -> str:
        return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s

    lines = [",".join([""] + [esc(c) for c in cols])]
    table = {}
    for g in summary.groups:
        vals = [summary.accuracy[g][c] for c in list(summary.tasks) + ["Average"]]
        if ad:
            vals += [summary.detection[g].normal_acc, summary.detection[g].anomaly_acc]
        table[g] = vals
        lines.append(",".join([esc(g)] + [repr(float(v)) for v in vals]))
    n = len(summary.groups)
    avg = [math.fsum(table[g][k] for g in summary.groups) / n if n else 0.0 for k in range(len(cols))]
    lines.append(",".join(["Average"] + [repr(float(v)) for v in avg]))
    with atomic_output(path) as f:
        f.write("\n".join(lines) + "\n")
