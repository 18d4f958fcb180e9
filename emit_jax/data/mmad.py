"""MMAD benchmark data: loading ``mmad.json`` / ``domain_knowledge.json`` and EMIT's evaluation prompts.

Model-free and pure Python (docs/reference/mmad.md 1-5, docs/reference/emit.md 7 and 12.1-12.2).

* :func:`load_mmad` / :func:`read_mmad` read ``<root>/mmad.json`` (a dict from query-image path to
  a record with a ``conversation`` of multiple-choice questions plus reference-image lists) and
  check its shape. Every problem is a one-line :class:`MMADError` naming the file, the record key
  and the question index; with ``policy="skip"`` bad records / questions are dropped instead and
  listed in a :class:`LoadReport` (and logged), never silently.
* :func:`load_domain_knowledge` reads ``<root>/domain_knowledge.json`` (dataset -> class ->
  entry -> text).
* :func:`build_prompt` / :func:`iter_prompts` turn one question into EMIT's user text (with
  ``<image>`` placeholders), its image list and the ``use_comp`` flag, exactly as EMIT's
  ``evaluate_batch_mmad_choice.py`` does: Anomaly Detection and ``Defect*`` questions are 1-shot
  (``similar_templates[0]`` then the query) with the class's domain knowledge; ``Object*``
  questions are 0-shot without it. Tokenisation and the ChatML wrapper live elsewhere; the system
  message is :data:`SYSTEM_PROMPT`.

Paths. Keys and template paths are relative to the data root with forward slashes. Absolute
paths, ``..`` components, backslashes and NUL characters are rejected, so every path joined onto
the root stays lexically inside it. Symbolic links inside the root are followed on purpose (a
shared ``MVTec-AD/`` folder is often a link).

Names. :func:`sub_dataset` is the first path component as written (``DS-MVTec``): it is the row
key of the MMAD results table. :func:`emit_dataset` is EMIT's ``dataset_r``: the same with
``DS-MVTec`` read as ``MVTec``; it selects the domain knowledge and gates ``use_comp``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from emit_jax.errors import MMADError
from emit_jax.fileio import pairs_noting_duplicates, read_json
from emit_jax.data import prompts
from emit_jax.data.prompts import INSTR_DIRECT, INSTR_THINK
from emit_jax.data.comp import COMP_TOKEN
from emit_jax.data.tokenizer import IM_END, IM_START, IMAGE_TAG, IMG_CONTEXT, IMG_END, IMG_START

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- constants
SYSTEM_PROMPT = prompts.SYSTEM_PROMPT

MMAD_JSON = "mmad.json"
DOMAIN_KNOWLEDGE_JSON = "domain_knowledge.json"

#: The four sub-datasets MMAD reports, in the published row order.
SUB_DATASETS = ("DS-MVTec", "MVTec-LOCO", "VisA", "GoodsAD")
#: Sub-dataset name -> domain-knowledge / EMIT dataset name (only DS-MVTec is renamed).
DATASET_ALIASES: Mapping[str, str] = {"DS-MVTec": "MVTec"}

#: Column keys of the results table (labels of EMIT's / MMAD's ``summary.py``), in order.
TASKS = ("Anomaly Detection", "Defect Classification", "Defect Localization",
         "Defect Description", "Defect Analysis", "Object Classification", "Object Analysis")
#: Column key -> task name printed in the paper's Table 1.
PAPER_TASK_NAMES: Mapping[str, str] = {
    "Anomaly Detection": "Anomaly Discrimination",
    "Defect Classification": "Defect Classification",
    "Defect Localization": "Defect Localization",
    "Defect Description": "Defect Description",
    "Defect Analysis": "Defect Analysis",
    "Object Classification": "Object Classification",
    "Object Analysis": "Object Analysis",
}
#: ``type`` values merged into another column by ``summary.py``.
MERGED_TYPES: Mapping[str, str] = {"Object Structure": "Object Analysis",
                                   "Object Details": "Object Analysis"}
#: Every ``type`` string accepted in mmad.json.
QUESTION_TYPES = frozenset(TASKS) | frozenset(MERGED_TYPES)

OPTION_LETTERS = ("A", "B", "C", "D", "E")

#: EMIT's prefix of the evaluation domain-knowledge block (followed directly by the entries).
DK_PREFIX = ("The following provides domain knowledge regarding the characteristics of a normal "
             "product, as well as the various possible types of defects:")

#: ``utils.string_list`` / ``utils.dataset_list`` of EMIT: CE + soft prompt switch on for a
#: 2-image prompt containing a trigger whose EMIT dataset is listed.
COMP_TRIGGERS = prompts.TRIGGER_PHRASES
COMP_DATASETS = prompts.EVAL_CE_DATASETS

#: Evaluation user text, 1-shot (Anomaly Detection, Defect*). ``{dk}`` is the whole block
#: (prefix included), ``{instr}`` the mode instruction, ``{question}`` the question block.
TWO_IMAGE_EVAL_TEMPLATE = (
    "Image-1: <image>\nImage-2: <image>\nI have uploaded two images for review, each featuring a "
    "product. The product shown in the first image appears to be in perfect condition, free of any "
    "defects. To answer a multiple-choice question, please inspect the product in the second image. "
    "There is only one correct option.\n{dk}\nSelect your answer by responding with the letter "
    "corresponding to the correct option, such as 'A'. {instr}\n\nQuestion: {question}")
#: Evaluation user text, 0-shot (Object*): an empty DK slot and no space after ``Question:``
#: (both differ from the training prompt; docs/reference/emit.md 15 #10).
ONE_IMAGE_EVAL_TEMPLATE = (
    "Query image: <image>\nTo answer a multiple-choice question, please inspect the product in the "
    "given image. There is only one correct option.\n{dk}\nSelect your answer by responding with "
    "the letter corresponding to the correct option, such as 'A'. {instr}\n\nQuestion:{question}")

Policy = Literal["error", "skip"]
TemplateKind = Literal["similar", "random"]


# ------------------------------------------------------------------------------------ path names
def _parts(image_path: str) -> list[str]:
    return image_path.split("/")


def sub_dataset(image_path: str) -> str:
    """First path component as written (``DS-MVTec``, ``MVTec-LOCO``, ``VisA``, ``GoodsAD``): the
    results-table row key (docs/reference/mmad.md 7.1). See :func:`emit_dataset` for EMIT's renamed form."""
    return _parts(image_path)[0]


def emit_dataset(image_path: str) -> str:
    """EMIT's ``dataset_r``: the first path component with ``DS-MVTec`` read as ``MVTec``. Selects
    the domain knowledge and gates ``use_comp``; never used for aggregation."""
    first = sub_dataset(image_path)
    return DATASET_ALIASES.get(first, first)


def object_class(image_path: str) -> str:
    """Second path component: the object class (``bottle``, ``candle``...)."""
    parts = _parts(image_path)
    if len(parts) < 2:
        raise MMADError(f"{image_path!r}: no class component (expected <Dataset>/<class>/...)")
    return parts[1]


def is_normal_image(image_path: str, normal_flag: str = "good") -> bool:
    """MMAD's normal/anomalous split: the path contains lower-case ``good`` (case-sensitive, so
    ``GoodsAD`` alone does not count)."""
    return normal_flag in image_path


def task_of(question_type: str) -> str:
    """Results-table column key of a ``type`` value: ``Object Structure`` / ``Object Details`` ->
    ``Object Analysis``, every other value unchanged (as ``summary.py``)."""
    return MERGED_TYPES.get(question_type, question_type)


def paper_task_name(question_type: str) -> str:
    """Paper Table 1 name of a ``type`` value or column key (``Anomaly Detection`` ->
    ``Anomaly Discrimination``; Structure/Details -> ``Object Analysis``). Unknown names are
    returned unchanged."""
    task = task_of(question_type)
    return PAPER_TASK_NAMES.get(task, task)


def needs_reference(question_type: str) -> bool:
    """EMIT's 1-shot test: ``"Defect" in type or type == "Anomaly Detection"``. Those questions
    get the reference image and the domain knowledge; the others (``Object*``) get neither."""
    return "Defect" in question_type or question_type == "Anomaly Detection"


def check_relpath(path: Any) -> str:
    """Return ``path`` if it is a usable path relative to the data root, else raise
    :class:`MMADError` saying why: it must be a non-empty ``str`` with forward slashes, not
    absolute, with no ``..`` component, no backslash / NUL and no lone surrogate (not UTF-8)."""
    if not isinstance(path, str):
        raise MMADError(f"path must be a string, got {type(path).__name__}")
    if not path:
        raise MMADError("path is empty")
    if "\\" in path or "\x00" in path:
        raise MMADError(f"path {path!r} contains a backslash or NUL (use '/' separators)")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a "\\udcff" escape: a lone surrogate, which is not text
        raise MMADError(f"path {path!r} is not valid UTF-8 (it holds a lone surrogate "
                        "escape)") from None
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise MMADError(f"path {path!r} is absolute (must be relative to the data root)")
    if ".." in path.split("/"):
        raise MMADError(f"path {path!r} escapes the data root ('..')")
    return path


def resolve_path(root: str | os.PathLike, path: str) -> str:
    """``root/path`` after :func:`check_relpath`; the result is lexically inside ``root``."""
    rel = check_relpath(path)
    full = os.path.normpath(os.path.join(os.fspath(root), *rel.split("/")))
    base = os.path.normpath(os.fspath(root))
    if os.path.commonpath([base, full]) != base:  # unreachable after check_relpath; belt and braces
        raise MMADError(f"path {path!r} escapes the data root")
    return full


# ----------------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class Question:
    """One multiple-choice question of an image's ``conversation`` (docs/reference/mmad.md 2.3).

    ``index`` is the position in the original ``conversation`` list (kept when other questions
    of the record were skipped). ``options`` keeps mmad.json's insertion order. Unknown keys of
    the question object (e.g. ``annotation``) are kept in ``extra``."""

    image: str
    index: int
    text: str
    options: dict[str, str]
    answer: str
    type: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """Results-table column key (Structure/Details merged into ``Object Analysis``)."""
        return task_of(self.type)

    @property
    def paper_task(self) -> str:
        return paper_task_name(self.type)

    @property
    def sub_dataset(self) -> str:
        return sub_dataset(self.image)

    @property
    def needs_reference(self) -> bool:
        return needs_reference(self.type)


@dataclass(frozen=True)
class Record:
    """One query image of mmad.json with its questions (docs/reference/mmad.md 2.2).

    ``image`` is the mmad.json key (path relative to the root). ``mask_path`` is ``None`` for a
    normal image (empty, null or absent in the file); otherwise it is relative to
    ``<Dataset>/<class>/`` (see :meth:`mask_file`). ``root`` is the data root the record was read
    from (``None`` for records built in memory: file properties then return relative paths).
    Unknown record keys are kept in ``extra``."""

    image: str
    conversation: tuple[Question, ...]
    similar_templates: tuple[str, ...]
    random_templates: tuple[str, ...] = ()
    mask_path: str | None = None
    root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sub_dataset(self) -> str:
        return sub_dataset(self.image)

    @property
    def emit_dataset(self) -> str:
        return emit_dataset(self.image)

    @property
    def object_class(self) -> str:
        return object_class(self.image)

    @property
    def is_normal(self) -> bool:
        return is_normal_image(self.image)

    def path(self, rel: str) -> str:
        """``rel`` joined onto :attr:`root` (unchanged when the root is unknown)."""
        return rel if self.root is None else resolve_path(self.root, rel)

    @property
    def image_file(self) -> str:
        return self.path(self.image)

    def template(self, kind: TemplateKind = "similar") -> str:
        """The 1-shot reference image key: ``similar_templates[0]`` (EMIT) or
        ``random_templates[0]`` (MMAD's published baselines)."""
        if kind == "similar":
            refs = self.similar_templates
        elif kind == "random":
            refs = self.random_templates
        else:
            raise ValueError(f"template kind must be 'similar' or 'random', got {kind!r}")
        if not refs:
            raise MMADError(f"record {self.image!r}: no {kind}_templates")
        return refs[0]

    def mask_candidates(self) -> list[str]:
        """Keys the mask may live at: ``<Dataset>/<class>/<mask_path>`` (InternVL agent mode; the
        HF layout) then ``<first three components>/<mask_path>`` (``generate_metadata.py``)."""
        if not self.mask_path:
            return []
        parts = _parts(self.image)
        out = ["/".join(parts[:2] + [self.mask_path])]
        alt = "/".join(parts[:3] + [self.mask_path])
        if alt != out[0]:
            out.append(alt)
        return out

    def mask_file(self) -> str | None:
        """The ground-truth mask: the first of :meth:`mask_candidates` that exists under the root,
        else the first candidate; ``None`` for a normal image."""
        cands = self.mask_candidates()
        if not cands:
            return None
        if self.root is not None:
            for c in cands:
                if os.path.isfile(self.path(c)):
                    return self.path(c)
        return self.path(cands[0])


@dataclass
class LoadReport:
    """What :func:`read_mmad` kept and dropped. ``skipped`` holds one line per dropped record or
    question (the message an ``"error"`` policy would have raised)."""

    path: str
    n_records: int = 0
    n_questions: int = 0
    skipped: list[str] = field(default_factory=list)
    #: one line per question that repeats an earlier one of its record (same text and options)
    repeated: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


# ----------------------------------------------------------------------------------------- loading
class _Bad(Exception):
    """Internal: one shape problem, message without the file / key prefix."""


def _read_json(path: str) -> Any:
    return read_json(path, error=MMADError, object_pairs_hook=pairs_noting_duplicates)


def _no_duplicates(obj: Any, what: str) -> None:
    dups = getattr(obj, "duplicates", ())
    if dups:
        raise _Bad(f"duplicate key(s) {list(dups)} in {what}")


def _bad_path(path: Any, what: str) -> str:
    try:
        return check_relpath(path)
    except MMADError as e:
        raise _Bad(f"{what}: {e}") from None


def _path_list(value: dict, key: str, *, required: bool) -> tuple[str, ...]:
    if key not in value:
        if required:
            raise _Bad(f"missing key {key!r}")
        return ()
    refs = value[key]
    if not isinstance(refs, list):
        raise _Bad(f"{key!r} must be a list of paths, got {type(refs).__name__}")
    if required and not refs:
        raise _Bad(f"{key!r} is empty (the 1-shot reference is {key}[0])")
    return tuple(_bad_path(p, f"{key}[{j}]") for j, p in enumerate(refs))


def _parse_shell(key: Any, value: Any, root: str | None, check_files: bool) -> dict[str, Any]:
    """Record-level checks; returns the Record fields other than ``conversation``."""
    key = _bad_path(key, "record key")
    if posixpath.normpath(key) != key:
        raise _Bad("record key is not a normalised path (no '.', '//' or trailing '/')")
    if len(key.split("/")) < 3:
        raise _Bad("record key must look like <Dataset>/<class>/.../<file>")
    if not isinstance(value, dict):
        raise _Bad(f"record must be a JSON object, got {type(value).__name__}")
    _no_duplicates(value, "the record")
    if "conversation" not in value:
        raise _Bad("missing key 'conversation'")
    if not isinstance(value["conversation"], list):
        raise _Bad(f"'conversation' must be a list, got {type(value['conversation']).__name__}")
    similar = _path_list(value, "similar_templates", required=True)
    rand = _path_list(value, "random_templates", required=False)
    mask = value.get("mask_path")
    if mask is not None and not isinstance(mask, str):
        raise _Bad(f"'mask_path' must be a string or null, got {type(mask).__name__}")
    mask = _bad_path(mask, "mask_path") if mask else None
    if check_files and root is not None:
        for what, rel in (("query image", key), ("similar_templates[0]", similar[0])):
            if not os.path.isfile(resolve_path(root, rel)):
                raise _Bad(f"{what} {rel!r} not found under {root}")
    known = {"conversation", "similar_templates", "random_templates", "mask_path"}
    return dict(image=key, similar_templates=similar, random_templates=rand, mask_path=mask,
                root=root, extra={k: v for k, v in value.items() if k not in known})


#: text the prompt builder writes itself: ``<image>`` (one per image, expanded to the image
#: tokens), the image and ``<COMP_CONTEXT>`` tokens and the chat template's turn markers. In a
#: question or option text they would break the image count or the turns.
RESERVED_MARKERS = (IMAGE_TAG, IMG_START, IMG_END, IMG_CONTEXT, COMP_TOKEN, IM_START, IM_END)


def _parse_question(image: str, index: int, q: Any) -> Question:
    if not isinstance(q, dict):
        raise _Bad(f"must be a JSON object, got {type(q).__name__}")
    _no_duplicates(q, "the question")
    for k in ("Question", "Options", "Answer", "type"):
        if k not in q:
            raise _Bad(f"missing key {k!r}")
    text, options, answer, qtype = q["Question"], q["Options"], q["Answer"], q["type"]
    if not isinstance(text, str) or not text.strip():
        raise _Bad("'Question' must be a non-empty string")
    if not isinstance(qtype, str) or qtype not in QUESTION_TYPES:
        raise _Bad(f"unknown question type {qtype!r} (known: {sorted(QUESTION_TYPES)})")
    if not isinstance(options, dict) or not options:
        raise _Bad("'Options' must be a non-empty object mapping letters to texts")
    _no_duplicates(options, "'Options'")
    if len(options) < 2:  # (sixteenth probe S1: asked, and always scored right)
        raise _Bad(f"'Options' has one option ({next(iter(options))!r}): a question needs at "
                   "least two, or every answer is right")
    for letter, opt in options.items():
        if letter not in OPTION_LETTERS:
            raise _Bad(f"option key {letter!r} is not one of {''.join(OPTION_LETTERS)}")
        if not isinstance(opt, str):
            raise _Bad(f"option {letter!r} must be a string, got {type(opt).__name__}")
    for where, t in [("'Question'", text)] + [(f"option {k!r}", v) for k, v in options.items()]:
        if not t.strip():
            raise _Bad(f"{where} is empty")
        marker = next((m for m in RESERVED_MARKERS if m in t), None)
        if marker:  # before: a traceback at that question, the model loaded and earlier ones asked
            raise _Bad(f"{where} holds {marker!r}, a marker the prompt builder places itself "
                       "(one <image> per image, the image and EMIT tokens); remove it")
    if not isinstance(answer, str) or answer not in options:
        raise _Bad(f"answer {answer!r} is not among the options {list(options)}")
    twin = next((k for k, v in options.items()
                 if k != answer and " ".join(v.split()).lower()
                 == " ".join(options[answer].split()).lower()), None)
    if twin is not None:  # before: asked, and an answer of the twin scored wrong
        raise _Bad(f"options {answer!r} (the answer) and {twin!r} have the same text "
                   f"{options[answer]!r}: no answer can be told right")
    known = {"Question", "Options", "Answer", "type"}
    return Question(image=image, index=index, text=text, options=dict(options), answer=answer,
                    type=qtype, extra={k: v for k, v in q.items() if k not in known})


def read_mmad(root: str | os.PathLike, json_name: str = MMAD_JSON, *, policy: Policy = "error",
              check_files: bool = False) -> tuple[list[Record], LoadReport]:
    """Read and validate ``root/json_name``; return the records (file order) and a report.

    A problem with a record (bad key or path, missing ``conversation`` / ``similar_templates``,
    wrong types, duplicate keys) concerns the whole record; a problem with a question (missing
    key, unknown ``type``, answer not among the options, option letters outside A-E) concerns
    that question only. ``policy="error"`` raises :class:`MMADError` on the first one;
    ``policy="skip"`` drops that record / question and records the message in
    ``report.skipped``. A file that is missing, not JSON or not a JSON object always raises.
    ``check_files`` also requires the query image and ``similar_templates[0]`` to exist."""
    if policy not in ("error", "skip"):
        raise ValueError(f"policy must be 'error' or 'skip', got {policy!r}")
    root = os.fspath(root)
    path = os.path.join(root, json_name)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise MMADError(f"{path}: top level must be a JSON object (image path -> record), "
                        f"got {type(data).__name__}")
    report = LoadReport(path=path)
    dup_keys = set(getattr(data, "duplicates", ()))

    def problem(msg: str) -> None:
        if policy == "error":
            raise MMADError(msg)
        report.skipped.append(msg)

    records = []
    for key, value in data.items():
        where = f"{path}: record {key!r}"
        try:
            if key in dup_keys:
                raise _Bad("key appears more than once in the file")
            shell = _parse_shell(key, value, root, check_files)
        except _Bad as e:
            problem(f"{where}: {e}")
            continue
        questions, seen = [], {}
        for i, q in enumerate(value["conversation"]):
            try:
                questions.append(_parse_question(key, i, q))
            except _Bad as e:
                problem(f"{where}: question {i}: {e}")
                continue
            asked = (questions[-1].text.strip(), tuple(sorted(questions[-1].options.items())))
            if asked in seen:  # asked and scored once more: the record's accuracy counts it twice
                report.repeated.append(f"{where}: question {i} repeats question {seen[asked]}")
            seen.setdefault(asked, i)
        records.append(Record(conversation=tuple(questions), **shell))
        report.n_questions += len(questions)
    report.n_records = len(records)
    return records, report


def load_mmad(root: str | os.PathLike, json_name: str = MMAD_JSON, *, policy: Policy = "error",
              check_files: bool = False) -> list[Record]:
    """:func:`read_mmad` without the report; with ``policy="skip"`` the number of dropped items
    and the first reasons are logged as a warning."""
    records, report = read_mmad(root, json_name, policy=policy, check_files=check_files)
    if report.skipped:
        log.warning("%s: skipped %d malformed record(s)/question(s); first: %s", report.path,
                    report.n_skipped, " | ".join(report.skipped[:3]))
    if report.repeated:
        n = len(report.repeated)
        print(f"note: {n} question{'s' if n > 1 else ''} repeat{'' if n > 1 else 's'} an earlier "
              f"one of the same record (same text and options), e.g. {report.repeated[0]}; "
              "each is asked and scored", file=sys.stderr)
    return records


def load_domain_knowledge(root: str | os.PathLike, json_name: str = DOMAIN_KNOWLEDGE_JSON
                          ) -> dict[str, dict[str, dict[str, str]]]:
    """Read ``root/json_name``: dataset (``MVTec``, ``MVTec-LOCO``, ``VisA``, ``GoodsAD``) ->
    class -> entry (``good``, defect names) -> text, in file order. Any other shape raises
    :class:`MMADError` naming the file and the key path."""
    path = os.path.join(os.fspath(root), json_name)
    data = _read_json(path)

    def need_obj(obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise MMADError(f"{path}: {where}: must be a JSON object, got {type(obj).__name__}")
        if getattr(obj, "duplicates", ()):
            raise MMADError(f"{path}: {where}: duplicate key(s) {list(obj.duplicates)}")

    need_obj(data, "top level")
    out: dict[str, dict[str, dict[str, str]]] = {}
    for ds, classes in data.items():
        need_obj(classes, f"{ds!r}")
        out[ds] = {}
        for cls, entries in classes.items():
            need_obj(entries, f"{ds!r}/{cls!r}")
            for name, text in entries.items():
                if not isinstance(text, str):
                    raise MMADError(f"{path}: {ds!r}/{cls!r}/{name!r}: must be a string, "
                                    f"got {type(text).__name__}")
                marker = next((m for m in RESERVED_MARKERS if m in text), None)
                if marker:  # before: a traceback at the first question whose prompt held it
                    raise MMADError(f"{path}: {ds!r}/{cls!r}/{name!r}: holds {marker!r}, a "
                                    "marker the prompt builder places itself; remove it")
            out[ds][cls] = dict(entries)
    return out


# ----------------------------------------------------------------------------------------- prompts
def question_block(question: Question) -> str:
    """``{Question} \\n`` then one ``{letter}. {text}\\n`` line per option, stored order and
    letters (EMIT's ``parse_conversation``; docs/reference/mmad.md 5.1)."""
    return f"{question.text} \n" + "".join(f"{k}. {v}\n" for k, v in question.options.items())


def domain_knowledge_block(domain_knowledge: Mapping[str, Mapping[str, Mapping[str, str]]],
                           image_path: str) -> str:
    """EMIT's evaluation DK: :data:`DK_PREFIX` + the class's entries joined with ``\\n`` in file
    order (not shuffled). The entries start with a space, so it reads ``defects: <Normal ...``."""
    ds, cls = emit_dataset(image_path), object_class(image_path)
    try:
        entries = domain_knowledge[ds][cls]
    except KeyError:
        raise MMADError(f"domain knowledge has no entry {ds!r}/{cls!r} (needed by {image_path!r})"
                        ) from None
    return DK_PREFIX + "\n".join(entries.values())


def use_comp(text: str, n_images: int, image_path: str) -> bool:
    """EMIT's evaluation rule (``len(images) == 2 and utils.if_use_comp(text, dataset_r)``):
    exactly two images, the EMIT dataset (:func:`emit_dataset`) in :data:`COMP_DATASETS` and a
    :data:`COMP_TRIGGERS` phrase anywhere in the user text (domain knowledge included)."""
    return (n_images == 2 and emit_dataset(image_path) in COMP_DATASETS
            and any(s in text for s in COMP_TRIGGERS))


@dataclass(frozen=True)
class Prompt:
    """One evaluation query. ``text`` is the user turn with one ``<image>`` per entry of
    ``images`` (in order: reference first). ``images`` are files under the root (keys when the
    record has no root); ``image_keys`` the same relative to the root. ``question_text`` is the
    question block (the ``question.text`` of the answers file)."""

    text: str
    images: list[str]
    image_keys: list[str]
    use_comp: bool
    question: Question
    question_text: str
    think: bool = False

    def answer_row(self, gpt_answer: str | None, **extra: Any) -> dict[str, Any]:
        """The answers-file element for this question (docs/reference/mmad.md 6.1) with the parsed letter;
        ``extra`` fields (e.g. ``response``) are appended after the standard ones."""
        q = self.question
        row = {"image": q.image, "question": {"type": "text", "text": self.question_text},
               "question_type": q.type, "options": dict(q.options), "correct_answer": q.answer,
               "gpt_answer": gpt_answer}
        row.update(extra)
        return row


def build_prompt(record: Record, question: int | Question,
                 domain_knowledge: Mapping[str, Mapping[str, Mapping[str, str]]] | None, *,
                 think: bool = False, template: TemplateKind = "similar") -> Prompt:
    """EMIT's evaluation prompt for one question of ``record`` (an index into its conversation,
    or the :class:`Question` itself).

    Anomaly Detection / ``Defect*``: images ``[template, query]`` with ``template`` the first
    ``similar_templates`` entry (EMIT; ``"random"`` gives MMAD's baseline choice) and the domain
    knowledge of the class. ``Object*``: ``[query]`` and an empty DK slot.
    ``domain_knowledge=None`` leaves the DK slot empty for every question (an ablation, not
    EMIT's protocol). ``think`` selects the ``<think>/<answer>`` instruction."""
    q = record.conversation[question] if isinstance(question, int) else question
    if q.image != record.image:
        raise ValueError(f"question of {q.image!r} given with record {record.image!r}")
    instr = INSTR_THINK if think else INSTR_DIRECT
    qtext = question_block(q)
    if q.needs_reference:
        dk = "" if domain_knowledge is None else domain_knowledge_block(domain_knowledge, q.image)
        keys = [record.template(template), record.image]
        text = TWO_IMAGE_EVAL_TEMPLATE.format(dk=dk, instr=instr, question=qtext)
    else:
        keys = [record.image]
        text = ONE_IMAGE_EVAL_TEMPLATE.format(dk="", instr=instr, question=qtext)
    return Prompt(text=text, images=[record.path(k) for k in keys], image_keys=keys,
                  use_comp=use_comp(text, len(keys), q.image), question=q, question_text=qtext,
                  think=think)


def iter_questions(records: Iterable[Record]) -> Iterator[tuple[Record, Question]]:
    """Every (record, question) pair in EMIT's evaluation order (file order, conversation order)."""
    for rec in records:
        for q in rec.conversation:
            yield rec, q


def iter_prompts(records: Iterable[Record],
                 domain_knowledge: Mapping[str, Mapping[str, Mapping[str, str]]] | None, *,
                 think: bool = False, template: TemplateKind = "similar") -> Iterator[Prompt]:
    """:func:`build_prompt` for every question, flattened in EMIT's order."""
    for rec, q in iter_questions(records):
        yield build_prompt(rec, q, domain_knowledge, think=think, template=template)


def question_counts(records: Sequence[Record]) -> dict[str, dict[str, int]]:
    """Questions per sub-dataset and column key (Structure/Details merged), for sanity checks
    against docs/reference/mmad.md 8's table."""
    out: dict[str, dict[str, int]] = {}
    for rec, q in iter_questions(records):
        row = out.setdefault(rec.sub_dataset, {})
        row[q.task] = row.get(q.task, 0) + 1
    return out
