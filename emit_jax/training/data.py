"""Training data for a run: the dataset, its tokenizer and the per-stage record lists.

For the embedded default everything is built on first use into the workdir (the dataset itself
into the shared cache): a tiny byte-level BPE trained on EMIT's prompt corpus plus the dataset's
domain knowledge and descriptions, and JSONL files per stage.

Stage data:
- ``warmup`` (embedded default only): the same questions with the images replaced by one
  sentence stating what they show ("The second product is a nut with a hole at the top.") at the
  end of the user turn (where stage 1 puts the contrastive tokens), the
  options reshuffled several times: short, text-only sequences that teach a randomly initialised
  LLM the answer format and to pick the letter of the option that matches what it knows — what
  a pretrained LLM brings to EMIT. Direct answers (the base stage teaches the think format).
- ``warmup_map`` (embedded default only): the same for anomaly discrimination and defect
  localization, the sentence replaced by EMIT's hint text and a coarse defect map of the query
  drawn from its ground-truth mask (:func:`defect_map`: one ``#`` / ``-`` character per
  contrastive token, row-major, so the map has the CE tokens' count and place). Meant to teach
  the tiny LLM to read a spatial defect map where stage 1 puts the heat-map tokens (the
  knowledge a pretrained MLLM brings to EMIT's stage 1); measured not to within a few hundred
  steps (docs/training.md), so no default recipe uses it.
- ``base`` (embedded default only: teaches the tiny MLLM the task before EMIT's stages): all
  four tasks, half with direct answers and half with a templated ``<think>`` rationale (object,
  defect and region from the annotations) followed by ``<answer>X</answer>``, so the model knows
  the output format GRPO rewards. No soft prompt, no contrastive tokens.
- ``sft`` (stage 1): anomaly discrimination + defect localization, direct answers.
- ``grpo`` (stage 2): all four tasks, think instruction, ``solution`` letters.
- ``validation`` / ``test``: stage-2 style questions of those splits.
- ``adfm`` / ``adfm_test`` (only with ``adfm_frame``): AD-FM records of the train / test split
  (:mod:`emit_jax.data.adfm`: three-stage prompt, ``solution`` A/B, ``bbox_answer`` in the
  model frame).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sys

import numpy as np
from PIL import Image

from emit_jax.data import jsonl, prompts, tasks
from emit_jax.data.image import UNREADABLE
from emit_jax.data.records import load_domain_knowledge, note_missing_defects
from emit_jax.data.mvtec import Report, scan
from emit_jax.errors import DataError
from emit_jax.fileio import read_json, read_text
from emit_jax.models.emit import HINT_TEXT

REGION_WORDS = {r: r for r in prompts.REGIONS}
MAP_TASKS = ("anomaly_discrimination", "defect_localization")
WARMUP_HINTS = ("statement", "map")  # warmup.hint: a sentence, or a defect map (warmup_map)


def tokenizer_for(workdir: str, dataset_root: str | None):
    """Load ``workdir/tokenizer`` or train the tiny tokenizer there."""
    from emit_jax.data.tokenizer import (TokenizerError, default_corpus, load_tokenizer,
                                         train_tiny_tokenizer)

    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        try:
            return load_tokenizer(tok_dir, require_comp=True)
        except TokenizerError as e:  # (twenty-ninth probe U3: no way forward said)
            raise TokenizerError(f"{e}; move {tok_dir} out of the workdir and rerun: it is "
                                 "trained again from the dataset's texts, as the first run "
                                 "did") from None
    corpus = list(default_corpus())
    if dataset_root:
        dk = os.path.join(dataset_root, "domain_knowledge.json")
        if os.path.lexists(dk):  # read and checked as data.build reads it (one line if bad)
            for cls in load_domain_knowledge(dk).values():
                corpus.extend(str(v) for v in cls.values())
        desc_root = os.path.join(dataset_root, "descriptions")
        for dirpath, _, files in sorted(os.walk(desc_root)):
            texts = [os.path.join(dirpath, n) for n in sorted(files)]
            # regular files only (a pipe would block); one not UTF-8 is one line naming it
            corpus.extend(read_text(t, error=DataError)
                          for t in [t for t in texts if os.path.isfile(t)][:20])
    train_tiny_tokenizer(corpus, tok_dir)
    return load_tokenizer(tok_dir, require_comp=True)


def _facts(meta: dict) -> tuple[str, str | None, str]:
    """(object, defect kind or None, where) from a question's meta / a record."""
    obj = meta["object_type"].replace("_", " ")
    if not meta["adlabel"]:
        return obj, None, ""
    where = meta["defect_location"][0] if meta["defect_location"] else "surface"
    return obj, (meta["anomaly_type"] or "defect").replace("_", " "), where


#: how templated think answers read (``data.rationale``): ``brief`` states the object and the
#: defect, then the letter; ``restate`` (the four-option tasks) restates the options word then
#: letter and names the answer's option, so the letter is a copy (:func:`restated`)
RATIONALES = ("brief", "restate")
RESTATED_TASKS = ("defect_classification", "defect_localization", "object_classification")


def rationale(meta: dict, letter: str, options=None, style: str = "brief") -> str:
    """The templated think answer for a question's ``meta`` (or a record), its letter and,
    for ``style="restate"``, its ``options`` (:func:`restated`)."""
    if style not in RATIONALES:
        raise ValueError(f"data.rationale must be one of {', '.join(RATIONALES)}, got {style!r}")
    if style == "restate" and options and meta.get("task_type") in RESTATED_TASKS:
        body = restated(meta["task_type"], options, letter)
    else:
        obj, kind, where = _facts(meta)
        body = f"The product is a {obj}. Compared with the reference " + (
            "it looks normal and intact." if kind is None else f"there is a {kind} at the {where}.")
    return f"<think>{body}</think><answer>{letter}</answer>"


def restated(task: str, options, letter: str) -> str:
    """The ``restate`` rationale of a four-option question::

        A Cable A
        B Nut B
        The product is a Nut B

    Each option is restated as its letter, its words and its letter again, then the answer's
    words and its letter. Every token is then a copy the tiny LLM learns within a few hundred
    steps: the option after a letter, the letter before, and, last, the letter that followed
    the same words in the restatement (induction). What it cannot learn in that budget is the
    letter that *precedes* a matching word in the prompt, which a direct answer needs
    (docs/training.md, "Reading four options"). Localization options are synonyms of a grid
    cell ("Left upper."), so each is restated with its cell (``A Left upper, top left A``) and
    the answer names the cell."""
    idx = prompts.LETTERS.index(letter)
    words = [str(o).strip().rstrip(".") for o in options]
    if task == "defect_localization":
        cells = [prompts.REGION_OF.get(str(o).strip(), w.lower()) for o, w in zip(options, words)]
        lines = [f"{L} {w}, {c} {L}" for L, w, c in zip(prompts.LETTERS, words, cells)]
        fact = f"The defect is at the {cells[idx]} {letter}"
    else:
        lines = [f"{L} {w} {L}" for L, w in zip(prompts.LETTERS, words)]
        fact = ("The product is a " if task == "object_classification" else
                "The defect is a ") + f"{words[idx]} {letter}"
    return "\n".join(lines + [fact])


def _statement(meta: dict) -> str:
    obj, kind, where = _facts(meta)
    return f"The second product is a {obj} in perfect condition." if kind is None else \
        f"The second product is a {obj} with a {kind} at the {where}."


# one token each in the tiny tokenizer, runs of either not merged by its BPE (checked by hand:
# 64 characters -> 64 tokens for every map of the embedded default)
MAP_DEFECT, MAP_CLEAN = "#", "-"


def defect_map(mask_path: str | None, grid: int) -> str:
    """``grid``x``grid`` characters, row-major, no separators: ``#`` where a cell of the mask
    (split into equal bands) has a non-zero pixel, else ``-``; all ``-`` without a mask."""
    cells = np.zeros((grid, grid), bool)
    if mask_path:
        try:
            with Image.open(mask_path) as im:
                m = np.asarray(im.convert("L")) > 0
        except UNREADABLE as e:
            raise DataError(f"{mask_path}: not a readable mask ({e})") from None
        h, w = m.shape
        for i in range(grid):
            for j in range(grid):
                cells[i, j] = m[i * h // grid:(i + 1) * h // grid,
                                j * w // grid:(j + 1) * w // grid].any()
    return "".join(MAP_DEFECT if c else MAP_CLEAN for c in cells.ravel())


def with_rationales(records: list[dict], style: str = "brief") -> list[dict]:
    """Stage-2 records (``solution`` letters) with templated think answers as assistant turns
    (the SFT-instead-of-GRPO ablation trains on these)."""
    return jsonl.with_answers(records, lambda r: rationale(r, r["solution"], r.get("options"),
                                                           style))


#: the tasks ``words`` applies to (anomaly discrimination keeps its letter); ``all_words`` adds
#: anomaly discrimination (``Yes.`` / ``No.``), so no trained answer is a bare letter
WORD_TASKS = RESTATED_TASKS
ALL_WORD_TASKS = ("anomaly_discrimination", *RESTATED_TASKS)
#: the answer forms in words (``data.answers``) -> the tasks whose answers they put in words
WORDED_TASKS = {"words": WORD_TASKS, "all_words": ALL_WORD_TASKS}
#: how the trained answers read (``data.answers``): ``letter`` (EMIT's: the option's letter),
#: ``words`` (the four-option tasks' option's own words, "Nut.": what EMIT's parser maps to the
#: option whose text is closest when a response holds no letter, ``eval.scoring.parse_answer``)
#: or ``all_words`` (anomaly discrimination's too)
ANSWER_FORMS = ("letter", *WORDED_TASKS)
_ANSWER_LETTER = re.compile(r"<answer>([A-E])</answer>")


def in_words(records: list[dict], tasks_: tuple = WORD_TASKS) -> list[dict]:
    """``records`` (stage 1's or the base stage's: an assistant turn that is a letter, or a think
    answer ending in ``<answer>X</answer>``) with the four-option tasks' letter replaced by the
    chosen option's words ("B" -> "Nut."; ``data.answers='words'``). The tiny LLM names what it
    sees instead of pointing at a letter, which it does not learn within the budget
    (docs/training.md, "Answering with the option's words"); EMIT's parser maps a response
    without a letter to the closest option text, so the evaluation scores it as that letter.
    ``tasks_``: the tasks whose answers change (:data:`ALL_WORD_TASKS` for
    ``data.answers='all_words'``). Other records are returned as they are."""
    out = []
    for r in records:
        if r.get("task_type") not in tasks_ or r["messages"][-1]["role"] != "assistant":
            out.append(r)
            continue
        answer, opts = r["messages"][-1]["content"], r.get("options") or []
        found = _ANSWER_LETTER.findall(answer)
        letter = answer.strip() if answer.strip() in prompts.LETTERS else \
            (found[-1] if found else None)
        if letter is None or prompts.LETTERS.index(letter) >= len(opts):
            raise ValueError(f"record {r.get('id')!r}: its answer {answer[-40:]!r} names no "
                             "option letter to put in words")
        words = str(opts[prompts.LETTERS.index(letter)]).strip()
        new = words if answer.strip() == letter else \
            answer[:answer.rindex(f"<answer>{letter}</answer>")] + f"<answer>{words}</answer>"
        out.append(dict(r, messages=list(r["messages"][:-1]) +
                        [dict(r["messages"][-1], content=new)]))
    return out


def warmup_records(questions, *, seed: int = 0, shuffles: int = 4,
                   think_every: int = 0, map_grid: int = 0, style: str = "brief") -> list[dict]:
    """Text-only versions of ``questions`` (see the module docstring): per question ``shuffles``
    option orders with direct answers (``"B"``: the letter is the whole lesson); with
    ``think_every`` = k > 0 every k-th one has a templated think answer instead. ``map_grid`` >
    0: the hint is a ``map_grid``-square defect map (``warmup_map``) and only the image
    questions of anomaly discrimination and defect localization are kept."""
    out = []
    for i, q in enumerate(questions):
        if map_grid and (q.task not in MAP_TASKS or q.meta.get("chat_type") != "image"):
            continue
        hint = (HINT_TEXT + defect_map(q.meta.get("mask_path") if q.meta["adlabel"]
                                            else None, map_grid)) if map_grid \
            else _statement(q.meta)
        rng = random.Random(f"{seed}-{i}")
        for k in range(shuffles):
            opts = list(q.options)
            rng.shuffle(opts)
            letter = prompts.LETTERS[opts.index(q.options[prompts.LETTERS.index(q.answer)])]
            think = think_every > 0 and k % think_every == think_every - 1
            block = prompts.qblock(prompts.QUESTIONS[q.task], opts)
            instr = prompts.INSTR_THINK if think else prompts.INSTR_DIRECT
            # the statement closes the user turn, where EMIT's <COMP_CONTEXT> slots go
            user = (f"Select your answer by responding with the letter corresponding to the "
                    f"correct option, such as 'A'. {instr}\n\nQuestion: {block}{hint}")
            answer = rationale(q.meta, letter, opts, style) if think else letter
            out.append({"id": f"warmup{'-map' if map_grid else ''}-{i:05d}-{k}", "images": [],
                        "messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": answer}],
                        "solution": letter, "options": opts,
                        **{key: q.meta[key] for key in ("object_type", "task_type", "adlabel")}})
    return out


def asked_to_think(records: list[dict]) -> list[dict]:
    """Held-out records (the direct instruction in the user turn) asked with the think
    instruction instead (``eval_instruction='think'``); their answers stay as they were (the
    evaluation compares the parsed letter with ``solution``)."""
    return asked_with(records, "think")


def asked_with(records: list[dict], instruction: str) -> list[dict]:
    """``records`` with ``instruction`` (``"think"``: ``prompts.INSTR_THINK``, ``"direct"``:
    ``prompts.INSTR_DIRECT``) in the user turn in place of the other one, other turns unchanged;
    a user turn without the other instruction raises."""
    new, old = ((prompts.INSTR_THINK, prompts.INSTR_DIRECT) if instruction == "think"
                else (prompts.INSTR_DIRECT, prompts.INSTR_THINK))
    out = []
    for r in records:
        user = r["messages"][0]["content"]
        if user.count(old) != 1:
            other = "direct" if instruction == "think" else "think"
            raise ValueError(f"record {r.get('id')!r}: no {other} instruction in the user turn "
                             f"to replace by the {instruction} instruction")
        out.append(dict(r, messages=[dict(r["messages"][0], content=user.replace(old, new))]
                        + list(r["messages"][1:])))
    return out


def think_records(records: list[dict], style: str = "brief") -> list[dict]:
    """Stage-1 records (direct instruction, a letter as the assistant turn) as think records:
    the think instruction in the user turn and the templated rationale (:func:`rationale`:
    object, then "looks normal" or the defect and where, then the letter) as the answer.

    With these, stage 1's cross-entropy asks the contrastive tokens for the *belief* (normal or
    defective) before the letter, instead of only for the letter, which is that belief XOR the
    option order (``sft.think``; docs/training.md)."""
    out = []
    for r in records:
        user, answer = r["messages"][0]["content"], r["messages"][-1]["content"]
        if user.count(prompts.INSTR_DIRECT) != 1 or r["messages"][-1]["role"] != "assistant":
            raise ValueError(f"record {r.get('id')!r}: not a stage-1 record (one direct "
                             "instruction in the user turn, a letter as the assistant turn)")
        out.append(dict(r, messages=[
            {"role": "user", "content": user.replace(prompts.INSTR_DIRECT, prompts.INSTR_THINK)},
            {"role": "assistant", "content": rationale(r, answer, r.get("options"), style)}]))
    return out


def stage_records(dataset_root: str, workdir: str, *, seed: int = 0, text_samples: bool = True,
                  dk_sentences: int = 0, base_think: bool = True,
                  domain_knowledge: bool = True,
                  adfm_frame: tuple[int, int] | None = None,
                  map_grid: int = 0, ad_order: str = "shuffled",
                  rationale_style: str = "brief") -> dict[str, list[dict]]:
    """{'warmup', 'base', 'sft', 'grpo', 'validation', 'test'} -> records (cached as JSONL in workdir).
    ``domain_knowledge=False`` leaves the domain-knowledge block out of every prompt.
    ``adfm_frame`` ``(W, H)``: also the AD-FM sets ``adfm`` and ``adfm_test``, boxes in that
    frame (the model's input size). ``map_grid`` > 0: also ``warmup_map``, defect maps of that
    grid (the model's contrastive-token grid). ``ad_order``: the anomaly-discrimination options'
    order in every set (``tasks.build_questions``); a workdir's record files keep the order they
    were written with, and a different one raises; so does ``rationale_style``, the think
    answers' form (:data:`RATIONALES`)."""
    out_dir = os.path.join(workdir, "data")
    names = ("warmup", "base", "sft", "grpo", "validation", "test") + \
        (("adfm", "adfm_test") if adfm_frame else ()) + (("warmup_map",) if map_grid else ())
    paths = {n: os.path.join(out_dir, f"{n}.jsonl") for n in names}
    options_path = os.path.join(out_dir, "options.json")  # how the questions were built
    if all(os.path.isfile(p) for p in paths.values()):  # image paths must stay in the dataset
        # (an options.json without a rationale entry: written before it existed)
        built = {"ad_order": "shuffled", "rationale": "brief"}
        if not os.path.lexists(options_path):  # (nineteenth probe D04: the old defaults were
            # assumed, and the records refused as built "with ad_order='shuffled'")
            raise DataError(f"{options_path}: missing, so how the records beside it were built "
                            "(ad_order, rationale) cannot be told; restore the file, or move "
                            f"{out_dir} out of the workdir to build the records again (its "
                            "stages are kept; a rerun compares their settings)")
        stored = read_json(options_path, error=DataError, what="the records' options file")
        if not isinstance(stored, dict):
            raise DataError(f"{options_path}: not the records' options file (a JSON object "
                            f"expected, got {type(stored).__name__}); delete the workdir's "
                            "data folder to build the records again")
        built.update(stored)
        for key, want in (("ad_order", ad_order), ("rationale", rationale_style)):
            if built[key] != want:
                raise DataError(f"{out_dir}: the records were built with {key}={built[key]!r}, "
                                f"the config asks for {want!r}; use another workdir (or delete "
                                "its data folder and the stages trained on it)")
        digests = built.get("digests")
        for n, p in paths.items() if isinstance(digests, dict) else ():
            if n in digests and _digest(p) != digests[n]:  # before: trained on, no word
                raise DataError(f"{p}: changed since this workdir built it (the stages trained "
                                "and resume on these records, a checkpoint's data position "
                                f"counts in them); restore it, or delete {out_dir}: the next "
                                "run builds the records again from the dataset (the same "
                                "ones while the dataset is unchanged) and keeps the stages")
        try:  # the run's own records: the dataset's symlinks were followed by its scan
            recs = {n: list(jsonl.read_jsonl(p, data_root=dataset_root, links=True))
                    for n, p in paths.items()}
        except jsonl.OutsideRootError as e:
            raise DataError(f"{e}: {out_dir} holds the records this workdir built, with the "
                            "paths of the dataset where it was then (moved since?); move it "
                            f"back, or delete {out_dir}: the next run builds the records again "
                            "from the dataset where it is now (the same questions) and keeps "
                            "the stages" + ("; the embedded dataset is cached where "
                                            "$EMIT_JAX_CACHE says (was it another?)"
                                            if os.path.basename(os.path.normpath(dataset_root))
                                            .startswith("embedded-v") else "")) from None
        _add_digests(options_path, built, paths)
        note_source_changes(dataset_root, out_dir)
        return recs
    items = scan(dataset_root)
    has_splits = os.path.isfile(os.path.join(dataset_root, "splits.json"))
    split = (lambda it, s: it.split == s) if has_splits else \
        (lambda it, s: (it.split == "train") == (s == "train"))
    if not has_splits:  # before: the two held-out sets were the same images, without a word
        print(f"note: {dataset_root} has no splits.json: the validation and the test questions "
              "are both asked of its test/ images (a splits.json holds a validation split "
              "apart)", file=sys.stderr)
    train = [it for it in items if split(it, "train")]
    refs = tasks.select_references(items, tasks.pixel_embedder(),
                                   pool=lambda it: split(it, "train"))
    dk_path = os.path.join(dataset_root, "domain_knowledge.json")
    dk = load_domain_knowledge(dk_path if os.path.lexists(dk_path) else None, items[0].dataset) \
        if domain_knowledge else None
    if dk:
        note_missing_defects(dk, items, dk_path)
    report = Report()  # errors raise; empty masks relabelled normal are counted
    kw = dict(seed=seed, references=refs, domain_knowledge=dk, dk_sentences=dk_sentences,
              ad_order=ad_order, report=report)
    recs: dict[str, list[dict]] = {}
    direct = tasks.build_questions(train, stage=2, think=False, **kw)
    think = tasks.build_questions(train, stage=2, think=True, text_samples=text_samples,
                                  **dict(kw, seed=seed + 1))
    base = jsonl.records(direct, 1)
    for i, q in enumerate(think if base_think else []):
        r = jsonl.question_to_record(q, 1, len(base) + i)
        r["messages"][1]["content"] = rationale(q.meta, q.answer, q.options, rationale_style)
        r["solution"] = q.answer  # the letter, for validation and rewards
        base.append(r)
    recs["base"] = base
    # restate: every warm-up answer a think answer (the format the base stage then reads off
    # the image), the direct four-option answers being the pointer the tiny LLM cannot learn
    recs["warmup"] = warmup_records(direct, seed=seed, style=rationale_style,
                                    think_every=1 if rationale_style == "restate" else 0)
    if map_grid:
        recs["warmup_map"] = warmup_records(direct, seed=seed, map_grid=map_grid)
    recs["sft"] = jsonl.records(tasks.build_questions(train, stage=1, **kw), 1)
    recs["grpo"] = jsonl.records(tasks.build_questions(train, stage=2, text_samples=text_samples,
                                                       **dict(kw, seed=seed + 2)), 2)
    for s in ("validation", "test"):
        part = [it for it in items if split(it, s)]
        recs[s] = jsonl.records(tasks.build_questions(part, stage=2, think=False, **kw), 2)
    if adfm_frame:
        from emit_jax.data import adfm

        recs["adfm"] = adfm.records(train, references=refs, frame=adfm_frame)
        recs["adfm_test"] = adfm.records([it for it in items if split(it, "test")],
                                         references=refs, frame=adfm_frame, prefix="adfm-test")
        # a fixed shuffle: an evaluation limit then takes a mix of classes, normal and anomalous
        random.Random(f"adfm-{seed}").shuffle(recs["adfm_test"])
    report.say_notes()
    from emit_jax.fileio import atomic_output

    options = {"ad_order": ad_order, "rationale": rationale_style}
    with atomic_output(options_path) as f:  # first: complete record files always have it
        json.dump(options, f)
    for n in names:
        jsonl.write_jsonl(recs[n], paths[n])
    with atomic_output(os.path.join(out_dir, SOURCE_FILES)) as f:  # the dataset they come from
        json.dump(source_listing(dataset_root), f)
    with atomic_output(options_path) as f:  # then what they hold, checked by every rerun
        json.dump(dict(options, digests={n: _digest(paths[n]) for n in names}), f)
    return recs


#: ``WORKDIR/data/source_files.json``: the dataset's files as the records were built from them
SOURCE_FILES = "source_files.json"


def source_listing(root: str) -> dict[str, list[int]]:
    """``{path relative to root: [size, mtime_ns]}`` of every file under the dataset folder
    ``root`` (its links followed once, names starting with a dot left out)."""
    out: dict[str, list[int]] = {}
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree: walked once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            out[os.path.relpath(path, root)] = [st.st_size, st.st_mtime_ns]
    return out


def note_source_changes(root: str, out_dir: str) -> None:
    """A ``note:`` line when the dataset ``root`` changed since the workdir built its records
    from it (files added, removed, or written since: :data:`SOURCE_FILES`). The records are
    kept (the stages trained, and resume, on them), so the run goes on with the questions of
    the old dataset, reading any changed image as it is now (twenty-second probe S04: not
    said). A workdir without the listing (written before it was kept) gets it now, quietly."""
    import jax

    path = os.path.join(out_dir, SOURCE_FILES)
    now = source_listing(root)
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError
    except (OSError, ValueError):
        if jax.process_index() == 0:
            from emit_jax.fileio import atomic_output

            with contextlib.suppress(OSError):
                with atomic_output(path) as f:
                    json.dump(now, f)
        return
    added = sorted(set(now) - set(old))
    removed = sorted(set(old) - set(now))
    changed = sorted(k for k in now if k in old and list(old[k]) != now[k])
    if not (added or removed or changed):
        return
    first = (added or changed or removed)[0]
    print(f"note: {root} changed since this workdir built its records from it ({len(added)} "
          f"file(s) added, {len(changed)} written since, {len(removed)} removed; e.g. {first}): "
          "the stages go on with the questions built then, reading a changed image as it is "
          f"now; to build them from the dataset as it is, move {out_dir} out of the workdir "
          "(the stages are kept; --config.restart=True trains them again)", file=sys.stderr)


def _add_digests(options_path: str, built: dict, paths: dict[str, str]) -> None:
    """Records a workdir wrote before digests were kept (checked record by record as they
    were just read) get their digests now, so later reruns refuse them changed too (before:
    such a workdir stayed unguarded). Only process 0 writes; a folder that cannot be written
    keeps the options as they were (the records are still read and checked)."""
    digests = built.get("digests") if isinstance(built.get("digests"), dict) else {}
    missing = [n for n in paths if n not in digests]
    if not missing:
        return
    import jax

    from emit_jax.fileio import atomic_output

    if jax.process_index() != 0:
        return
    try:
        with atomic_output(options_path) as f:
            json.dump(dict(built, digests={**digests, **{n: _digest(paths[n]) for n in missing}}),
                      f)
    except OSError:
        return
    print(f"note: {os.path.dirname(options_path)}: the records' digests are kept from now on "
          f"({', '.join(missing)}: written before digests were; each record was checked as it "
          "was read), and a rerun refuses them changed", file=sys.stderr)


def _digest(path: str) -> str:
    """SHA-256 of the file ``path`` (a records file), hex."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fresh_records(seeds, *, tasks_: tuple = ("anomaly_discrimination",),
                  cache_dir: str | None = None, ad_order: str = "shuffled",
                  domain_knowledge: bool = False, dk_sentences: int = 0) -> list[dict]:
    """Stage-1 records (direct answers) of the tasks ``tasks_`` (default anomaly
    discrimination) on every image of the embedded datasets drawn with ``seeds``
    (``emit_jax.data.embedded``: about 392 images per seed, built once into the cache, about
    7 s each on a 2-core CPU). Each query's reference is the most similar normal image of its
    class in its own dataset. Seed 0 is refused: it is the embedded default, whose validation
    and test splits are held out. Ids are ``fresh<seed>-...``."""
    return _whole_dataset_records(seeds, "fresh", stage=1, tasks_=tasks_, cache_dir=cache_dir,
                                  ad_order=ad_order, domain_knowledge=domain_knowledge,
                                  dk_sentences=dk_sentences)


def task_shares(records: list[dict], shares: dict, seed: int = 0) -> list[dict]:
    """``records`` with, of each task named in ``shares``, that share of its records kept
    (``round(share * n)`` of its ``n``, drawn with ``seed``; a task not named keeps all), in
    their order (``sft.fresh_shares``)."""
    for task, share in shares.items():
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the share of {task}: {share!r} is not in [0, 1]")
    rng = random.Random(seed)
    drop: set = set()
    for task, share in sorted(shares.items()):
        idx = [i for i, r in enumerate(records) if r["task_type"] == task]
        drop.update(rng.sample(idx, len(idx) - int(round(share * len(idx)))))
    return [r for i, r in enumerate(records) if i not in drop]


def fresh_base_records(seeds, tasks_: tuple, *, style: str = "brief", direct: float = 0.0,
                       pick_seed: int = 0, cache_dir: str | None = None,
                       ad_order: str = "shuffled", domain_knowledge: bool = False,
                       dk_sentences: int = 0) -> list[dict]:
    """The questions of ``tasks_`` on every image of the embedded datasets drawn with ``seeds``
    (as :func:`fresh_records`), each with the think instruction and its templated think answer
    (:func:`think_records`, ``style``) unless ``direct`` says otherwise: the base stage's extra
    image questions (``base.fresh_datasets``). Ids are ``basefresh<seed>-...``.

    ``direct`` in [0, 1]: that share of the questions (drawn with ``pick_seed``, the same draw
    for the same records) keeps the direct instruction and answer instead (``base.fresh_direct``:
    the held-out questions are asked with the direct instruction)."""
    if not 0.0 <= direct <= 1.0:  # before the datasets are drawn
        raise ValueError(f"direct={direct!r}: a share in [0, 1]")
    recs = _whole_dataset_records(seeds, "basefresh", stage=1, think=False, tasks_=tasks_,
                                  cache_dir=cache_dir, ad_order=ad_order,
                                  domain_knowledge=domain_knowledge, dk_sentences=dk_sentences)
    rng = random.Random(pick_seed)
    return [r if rng.random() < direct else t
            for r, t in zip(recs, think_records(recs, style))]


#: the first seed of the unseen evaluation datasets (``unseen_records``): far above any
#: ``sft.fresh_datasets`` count, so no stage ever trains on them
UNSEEN_SEED0 = 1000


def unseen_records(count: int, *, tasks_: tuple = ("anomaly_discrimination",),
                   cache_dir: str | None = None, ad_order: str = "shuffled",
                   domain_knowledge: bool = False, dk_sentences: int = 0) -> list[dict]:
    """Held-out records of every image of ``count`` embedded datasets no stage sees (seeds
    ``UNSEEN_SEED0``, ``UNSEEN_SEED0 + 1``, ...), built as the test split is (stage-2 prompts,
    direct answers) for the tasks ``tasks_``: about 392 anomaly-discrimination questions a
    dataset, so held-out accuracy with a standard error near 2.5 points instead of the test
    split's 74 questions. Ids are ``unseen<seed>-...``."""
    return _whole_dataset_records(range(UNSEEN_SEED0, UNSEEN_SEED0 + int(count)), "unseen",
                                  stage=2, think=False, tasks_=tasks_, cache_dir=cache_dir,
                                  ad_order=ad_order, domain_knowledge=domain_knowledge,
                                  dk_sentences=dk_sentences)


def _whole_dataset_records(seeds, prefix: str, *, stage: int, think: bool | None = None,
                           tasks_: tuple = ("anomaly_discrimination",),
                           cache_dir: str | None = None, ad_order: str = "shuffled",
                           domain_knowledge: bool = False, dk_sentences: int = 0) -> list[dict]:
    from emit_jax.data.embedded.cache import ensure_cached_many

    seeds = list(seeds)
    if 0 in seeds:
        raise ValueError(f"{prefix} datasets: seed 0 is the embedded default itself (its test "
                         "split is held out)")
    out: list[dict] = []
    for s, root in zip(seeds, ensure_cached_many(seeds, cache_dir)):  # built side by side
        items = scan(root)
        refs = tasks.select_references(items, tasks.pixel_embedder(),
                                       pool=lambda it: not it.is_anomalous)
        dk = load_domain_knowledge(os.path.join(root, "domain_knowledge.json"),
                                   items[0].dataset) if domain_knowledge else None
        qs = tasks.build_questions(items, stage=stage, seed=s, references=refs, domain_knowledge=dk,
                                   dk_sentences=dk_sentences, tasks=tuple(tasks_), think=think,
                                   ad_order=ad_order)
        out += [dict(r, id=f"{prefix}{s}-{r['id']}") for r in jsonl.records(qs, stage)]
    return out
