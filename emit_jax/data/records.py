"""EMIT's rule-built training records (docs/reference/emit.md 9.1) from an MVTec-AD-style dataset:
scan it, pick a reference (the most similar normal image) for every query, build the
multiple-choice questions (stage 1: anomaly discrimination + defect localization, direct answers;
stage 2: all four tasks, think/answer format) with domain knowledge, and write the JSONL file
atomically. ``python -m emit_jax.data.build`` is the command line over :func:`build`.
"""

from __future__ import annotations

import os
import random
import sys
import unicodedata
from collections import Counter

from emit_jax.data import adfm, jsonl, mmad, prompts, tasks
from emit_jax.data.mvtec import DataError, Report, scan, split_names
from emit_jax.fileio import check_writable


def load_domain_knowledge(path: str | os.PathLike | None, dataset: str | None = None) -> dict:
    """class -> {defect: text, 'good': text} from the domain-knowledge JSON file ``path``
    (dataset -> class -> entry -> text, read and checked by
    :func:`emit_jax.data.mmad.load_domain_knowledge`); datasets merged, ``dataset`` first, a class
    taken from the first dataset that has it. ``None``: ``{}``. A bad file raises
    :class:`DataError` naming it."""
    if path is None:
        return {}
    path = os.fspath(path)
    folder, name = os.path.split(path)
    try:
        data = mmad.load_domain_knowledge(folder, name)
    except mmad.MMADError as e:
        where = os.path.join(folder, name) + ": "
        detail = str(e)[len(where):] if str(e).startswith(where) else str(e)
        raise DataError(f"{path}: not a readable domain-knowledge JSON ({detail})") from None
    out, first = {}, {}
    for ds in sorted(data, key=lambda k: k != dataset):
        for cls, entries in data[ds].items():
            out.setdefault(cls, entries)
            first.setdefault(cls, ds)
            if first[cls] != ds:  # before: the second taken for nothing, without a word
                print(f"note: {path}: class {cls!r} is under {first[cls]!r} and {ds!r}; the "
                      f"entry of {first[cls]!r} is used", file=sys.stderr)
    return out


def note_missing_defects(dk: dict, items, dk_path: str) -> None:
    """A ``note:`` line when the domain knowledge of an image's class has no entry for its
    defect (a defect folder the file does not describe): those prompts describe the class
    without it. Compared as the prompts name defects (``broken_large`` = ``broken large``)."""
    missing: dict[str, set] = {}
    for it in items:
        entries = dk.get(it.object_type)
        if it.defect and entries is not None:
            known = {prompts.process_string(k) for k in entries}
            if prompts.process_string(it.defect) not in known:
                missing.setdefault(it.object_type, set()).add(it.defect)
    if missing:
        what = "; ".join(f"class {c!r}: {', '.join(map(repr, sorted(d)))}"
                         for c, d in sorted(missing.items()))
        print(f"note: {dk_path}: no entry for defect(s) of the images ({what}); their prompts "
              "give the class's knowledge without them", file=sys.stderr)


def subsample(items, max_per_type: int | None, seed: int):
    if not max_per_type:
        return items
    groups: dict = {}
    for it in items:
        groups.setdefault((it.object_type, it.defect, it.is_anomalous), []).append(it)
    out = []
    for key in sorted(groups, key=str):
        g = groups[key]
        if len(g) > max_per_type:
            g = sorted(random.Random(f"{seed}:{key}").sample(g, max_per_type), key=lambda i: i.path)
        out.extend(g)
    return out


def build(source: str, out: str, stage: int, *, seed: int = 0, split: str | None = None,
          domain_knowledge: str | None = None, embedding: str = "auto", vit_model=None,
          official_reference: bool = False, text_samples: bool = False,
          max_per_type: int | None = None, policy: str = "error",
          adfm_frame: int | None = None) -> dict:
    """EMIT records of ``stage`` from ``source`` written to the JSONL file ``out``; a summary
    dict. References are picked by similarity of ``embedding``: ``vit`` (the ViT of
    ``vit_model``, an InternVL / EMIT model), ``pixels``, or ``auto`` (vit when a model is given).
    ``adfm_frame`` (the model's input size, e.g. 448 for InternVL3): AD-FM records instead, GT
    boxes in that frame."""
    check_writable(out)  # before the work, not after it
    report = Report(policy)
    items = scan(source, report=report)
    has_splits = os.path.isfile(os.path.join(source, "splits.json"))
    if split is None and has_splits:
        split = "train"
    if split is not None and not split:
        raise DataError("--split: empty; name a split (train, validation, test) or 'all'")
    if split and split != "all":
        known = sorted({it.split for it in items})
        if split not in known:
            if split in split_names(source):  # before: "no such split" for an empty one
                raise DataError(f"--split {split!r}: {os.path.join(source, 'splits.json')} lists "
                                "no image in that split")
            raise DataError(f"--split {split!r}: {source} has no such split; choose from "
                            f"{', '.join(known + ['all'])}")
        items = [it for it in items if it.split == split]
    items = subsample(items, max_per_type, seed)
    if report.policy == "skip":  # unreadable images are skipped (and counted) before any is used
        items = tasks.readable(items, report)
    if not items:
        raise DataError(f"{source}: no images{f' in split {split!r}' if split else ''}")
    dk_path = domain_knowledge or (os.path.join(source, "domain_knowledge.json")
                                   if os.path.lexists(os.path.join(source, "domain_knowledge.json"))
                                   else None)
    if not adfm_frame:  # the domain knowledge before the work (AD-FM records use none)
        dk = load_domain_knowledge(dk_path, items[0].dataset)
        missing = sorted({it.object_type for it in items} - set(dk)) if dk_path else []
        if missing:  # its prompts would silently go without domain knowledge
            nfc = {unicodedata.normalize("NFC", k) for k in dk}
            same = [m for m in missing if unicodedata.normalize("NFC", m) in nfc]
            why = (f"; {', '.join(map(repr, same))} differ(s) from the file's name only in "
                   "Unicode normalisation (e.g. NFD folder names, as macOS writes them, against "
                   "NFC keys): rename so they match byte for byte") if same else ""
            raise DataError(f"{dk_path}: no domain knowledge for class(es) "
                            f"{', '.join(map(repr, missing))} of {source} (it has "
                            f"{', '.join(map(repr, sorted(dk))) or 'none'}); add them, or give "
                            f"another --domain-knowledge file{why}")
        if dk_path:
            note_missing_defects(dk, items, dk_path)
    if embedding == "auto":
        embedding = "vit" if vit_model is not None else "pixels"
    if embedding == "vit":
        if vit_model is None:
            raise DataError("--embedding vit needs --checkpoint (the model whose ViT embeds)")
        embed = tasks.vit_embedder(vit_model)
    else:
        embed = tasks.pixel_embedder()
    refs = tasks.select_references(items, embed, skip_rank1_for_anomalous=official_reference)
    classes = {it.object_type for it in items}
    unreferenced = sorted(classes - {it.object_type for it in items if it.path in refs})
    if unreferenced:  # their two-image questions (every stage-1 one) cannot be asked
        why = (f"class(es) {', '.join(map(repr, unreferenced))} of {source} have fewer than two "
               f"normal images{' (after --max-per-type)' if max_per_type else ''}, so no normal "
               "reference can be picked for their images")
        if len(unreferenced) == len(classes):
            raise DataError(f"no questions to build: {why}")
        print(f"note: {why}; their two-image questions are left out", file=sys.stderr)
    if adfm_frame:
        if adfm_frame < 1:
            raise DataError(f"--adfm-frame must be a positive size, got {adfm_frame}")
        recs = adfm.records(items, references=refs, frame=(adfm_frame, adfm_frame), report=report)
        boxless = sum(r["solution"] == "A" and not r["bbox_answer"] for r in recs)
        if boxless:  # before: said only by the summary's count
            print(f"note: {boxless} of {sum(r['solution'] == 'A' for r in recs)} anomalous images "
                  f"have no box in a {adfm_frame} x {adfm_frame} frame (their defects shrink to "
                  "nothing there; the model's input size, e.g. 448, keeps them)",
                  file=sys.stderr)
        n = jsonl.write_jsonl(recs, out)
        return {"out": out, "records": n, "images": len(items),
                "anomalous": sum(r["solution"] == "A" for r in recs),
                "boxes": sum(len(r["bbox_answer"]) for r in recs),
                "skipped": len(report.skipped), "embedding": embedding}
    qs = tasks.build_questions(items, stage=stage, seed=seed, references=refs,
                               domain_knowledge=dk, text_samples=text_samples, report=report)
    if not qs:
        raise DataError(f"{source}: no stage-{stage} questions from its {len(items)} images")
    n = jsonl.write_jsonl(jsonl.records(qs, stage), out)
    counts = Counter(q.task for q in qs)
    report.say_notes()
    if stage == 2:  # a task without questions is said (nineteenth probe B03: not said)
        kinds = sorted({it.defect for it in items if it.defect})
        for task, names, what in (("defect_classification", kinds, "defect type"),
                                  ("object_classification", sorted(classes), "class")):
            if not counts.get(task) and len(names) < 2:
                print(f"note: no {task.replace('_', ' ')} question: {source} has "
                      f"{len(names)} {what}{'' if len(names) == 1 else 's'}"
                      f"{' (' + repr(names[0]) + ')' if names else ''}, and its questions pick "
                      f"among at least two", file=sys.stderr)
    if text_samples and not any(it.description for it in items):  # (before: not said)
        print(f"note: --text-samples: no image of {source} has an object description (a .txt "
              "beside it), so no text-as-query question was added", file=sys.stderr)
    return {"out": out, "records": n, "images": len(items), "tasks": dict(sorted(counts.items())),
            "skipped": len(report.skipped), "relabelled_normal": len(set(report.relabelled)),
            "domain_knowledge": dk_path, "embedding": embedding}
