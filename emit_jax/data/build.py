"""``python -m emit_jax.data.build --source DIR --out train.jsonl --stage {1,2}``

Builds EMIT's training JSONL (EMIT_SPEC 9.1) from an MVTec-AD-style dataset: scans it, picks a
reference (most similar normal image) for every query, builds the multiple-choice questions
(stage 1: anomaly discrimination + defect localization, direct answers; stage 2: all four tasks,
think/answer format) with domain knowledge, and writes the file atomically.

Options: ``--domain-knowledge FILE`` (EMIT's dataset -> class -> {defect: text, good: text}
JSON; default ``DIR/domain_knowledge.json`` when present); ``--split`` (with a ``splits.json``,
which split to use; default ``train``); ``--embedding vit|pixels`` for the reference choice (vit
needs ``--checkpoint``; without one, pixels); ``--official-reference`` (the generator's rank-2
rule for anomalous queries); ``--text-samples``; ``--max-per-type N``; ``--policy error|skip``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter

from emit_jax import cli
from emit_jax.data import jsonl, tasks
from emit_jax.data.mvtec import DataError, Report, scan


def load_domain_knowledge(path: str | None, dataset: str | None = None) -> dict:
    """class -> {defect: text, 'good': text}; datasets merged (``dataset`` first)."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable domain-knowledge JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"{path}: expected {{dataset: {{class: {{defect: text}}}}}}")
    out: dict = {}
    order = sorted(data, key=lambda k: k != dataset)
    for ds in order:
        for cls, entries in data[ds].items():
            if isinstance(entries, dict):
                out.setdefault(cls, entries)
    return out


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
          domain_knowledge: str | None = None, embedding: str = "auto", checkpoint: str | None = None,
          official_reference: bool = False, text_samples: bool = False,
          max_per_type: int | None = None, policy: str = "error",
          adfm_frame: int | None = None) -> dict:
    """EMIT records of ``stage`` from ``source``; ``adfm_frame`` (the model's input size,
    e.g. 448 for InternVL3): AD-FM records instead, GT boxes in that frame."""
    from emit_jax.fileio import check_writable

    check_writable(out)  # before the work, not after it
    report = Report(policy)
    items = scan(source, report=report)
    has_splits = os.path.isfile(os.path.join(source, "splits.json"))
    if split is None and has_splits:
        split = "train"
    if split and split != "all":
        items = [it for it in items if it.split == split]
    items = subsample(items, max_per_type, seed)
    if not items:
        raise DataError(f"{source}: no images{f' in split {split!r}' if split else ''}")
    if embedding == "auto":
        embedding = "vit" if checkpoint else "pixels"
    if embedding == "vit":
        if not checkpoint:
            raise DataError("--embedding vit needs --checkpoint (the model whose ViT embeds)")
        from emit_jax.checkpoint import load_model

        model, _ = load_model(checkpoint)
        embed = tasks.vit_embedder(model)
    else:
        embed = tasks.pixel_embedder()
    refs = tasks.select_references(items, embed, skip_rank1_for_anomalous=official_reference)
    dk_path = domain_knowledge or (os.path.join(source, "domain_knowledge.json")
                                   if os.path.isfile(os.path.join(source, "domain_knowledge.json"))
                                   else None)
    if adfm_frame:
        from emit_jax.data import adfm

        if adfm_frame < 1:
            raise DataError(f"--adfm-frame must be a positive size, got {adfm_frame}")
        recs = adfm.records(items, references=refs, frame=(adfm_frame, adfm_frame), report=report)
        n = jsonl.write_jsonl(recs, out)
        return {"out": out, "records": n, "images": len(items),
                "anomalous": sum(r["solution"] == "A" for r in recs),
                "boxes": sum(len(r["bbox_answer"]) for r in recs),
                "skipped": len(report.skipped), "embedding": embedding}
    dk = load_domain_knowledge(dk_path, items[0].dataset)
    qs = tasks.build_questions(items, stage=stage, seed=seed, references=refs,
                               domain_knowledge=dk, text_samples=text_samples, report=report)
    n = jsonl.write_jsonl(jsonl.records(qs, stage), out)
    counts = Counter(q.task for q in qs)
    return {"out": out, "records": n, "images": len(items), "tasks": dict(sorted(counts.items())),
            "skipped": len(report.skipped), "domain_knowledge": dk_path, "embedding": embedding}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emit_jax.data.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="MVTec-AD-style dataset folder")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--stage", type=int, choices=[1, 2], required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default=None, help="split from splits.json (train|validation|test|all)")
    p.add_argument("--domain-knowledge", default=None)
    p.add_argument("--embedding", choices=["auto", "vit", "pixels"], default="auto")
    p.add_argument("--checkpoint", default=None, help="emit_jax model checkpoint for --embedding vit")
    p.add_argument("--official-reference", action="store_true",
                   help="anomalous queries get the 2nd most similar normal image (official bug)")
    p.add_argument("--text-samples", action="store_true")
    p.add_argument("--max-per-type", type=int, default=None)
    p.add_argument("--policy", choices=["error", "skip"], default="error")
    p.add_argument("--adfm-frame", type=int, default=None, metavar="SIZE",
                   help="write AD-FM records (three-stage prompt, solution A/B, bbox_answer "
                        "boxes in a SIZE x SIZE model frame) instead of EMIT's")
    a = p.parse_args(argv)
    summary = build(a.source, a.out, a.stage, seed=a.seed, split=a.split,
                    domain_knowledge=a.domain_knowledge, embedding=a.embedding,
                    checkpoint=a.checkpoint, official_reference=a.official_reference,
                    text_samples=a.text_samples, max_per_type=a.max_per_type, policy=a.policy,
                    adfm_frame=a.adfm_frame)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="emit_jax.data.build"))
