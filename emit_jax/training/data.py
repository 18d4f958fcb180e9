"""Training data for a run: the dataset, its tokenizer and the per-stage record lists.

For the embedded default everything is built on first use into the workdir (the dataset itself
into the shared cache): a tiny byte-level BPE trained on EMIT's prompt corpus plus the dataset's
domain knowledge and descriptions, and JSONL files per stage.

Stage data:
- ``base`` (embedded default only: teaches the tiny MLLM the task before EMIT's stages): all
  four tasks, half with direct answers and half with a templated ``<think>`` rationale (object,
  defect and region from the annotations) followed by ``<answer>X</answer>``, so the model knows
  the output format GRPO rewards. No soft prompt, no contrastive tokens.
- ``sft`` (stage 1): anomaly discrimination + defect localization, direct answers.
- ``grpo`` (stage 2): all four tasks, think instruction, ``solution`` letters.
- ``validation`` / ``test``: stage-2 style questions of those splits.
"""

from __future__ import annotations

import json
import os

from emit_jax.data import jsonl, prompts, tasks
from emit_jax.data.build import load_domain_knowledge
from emit_jax.data.mvtec import scan

REGION_WORDS = {r: r for r in prompts.REGIONS}


def tokenizer_for(workdir: str, dataset_root: str | None):
    """Load ``workdir/tokenizer`` or train the tiny tokenizer there."""
    from emit_jax.data.tokenizer import default_corpus, load_tokenizer, train_tiny_tokenizer

    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        return load_tokenizer(tok_dir, require_comp=True)
    corpus = list(default_corpus())
    if dataset_root:
        dk = os.path.join(dataset_root, "domain_knowledge.json")
        if os.path.isfile(dk):
            with open(dk, encoding="utf-8") as f:
                for ds in json.load(f).values():
                    for cls in ds.values():
                        corpus.extend(str(v) for v in cls.values())
        desc_root = os.path.join(dataset_root, "descriptions")
        for dirpath, _, files in sorted(os.walk(desc_root)):
            for name in sorted(files)[:20]:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    corpus.append(f.read())
    train_tiny_tokenizer(corpus, tok_dir)
    return load_tokenizer(tok_dir, require_comp=True)


def _rationale(q: tasks.Question) -> str:
    m = q.meta
    obj = m["object_type"].replace("_", " ")
    if not m["adlabel"]:
        body = f"The product is a {obj}. Compared with the reference it looks normal and intact."
    else:
        where = m["defect_location"][0] if m["defect_location"] else "surface"
        kind = (m["anomaly_type"] or "defect").replace("_", " ")
        body = f"The product is a {obj}. Compared with the reference there is a {kind} at the {where}."
    return f"<think>{body}</think><answer>{q.answer}</answer>"


def stage_records(dataset_root: str, workdir: str, *, seed: int = 0, text_samples: bool = True,
                  dk_sentences: int = 0, base_think: bool = True) -> dict[str, list[dict]]:
    """{'base', 'sft', 'grpo', 'validation', 'test'} -> records (cached as JSONL in workdir)."""
    out_dir = os.path.join(workdir, "data")
    names = ("base", "sft", "grpo", "validation", "test")
    paths = {n: os.path.join(out_dir, f"{n}.jsonl") for n in names}
    if all(os.path.isfile(p) for p in paths.values()):
        return {n: list(jsonl.read_jsonl(p)) for n, p in paths.items()}
    items = scan(dataset_root)
    has_splits = os.path.isfile(os.path.join(dataset_root, "splits.json"))
    split = (lambda it, s: it.split == s) if has_splits else \
        (lambda it, s: (it.split == "train") == (s == "train"))
    train = [it for it in items if split(it, "train")]
    refs = tasks.select_references(items, tasks.pixel_embedder(),
                                   pool=lambda it: split(it, "train"))
    dk_path = os.path.join(dataset_root, "domain_knowledge.json")
    dk = load_domain_knowledge(dk_path if os.path.isfile(dk_path) else None, items[0].dataset)
    kw = dict(seed=seed, references=refs, domain_knowledge=dk, dk_sentences=dk_sentences)
    recs: dict[str, list[dict]] = {}
    direct = tasks.build_questions(train, stage=2, think=False, **kw)
    think = tasks.build_questions(train, stage=2, think=True, text_samples=text_samples,
                                  **dict(kw, seed=seed + 1))
    base = jsonl.records(direct, 1)
    for i, q in enumerate(think if base_think else []):
        r = jsonl.question_to_record(q, 1, len(base) + i)
        r["messages"][1]["content"] = _rationale(q)
        r["solution"] = q.answer  # the letter, for validation and rewards
        base.append(r)
    recs["base"] = base
    recs["sft"] = jsonl.records(tasks.build_questions(train, stage=1, **kw), 1)
    recs["grpo"] = jsonl.records(tasks.build_questions(train, stage=2, text_samples=text_samples,
                                                       **dict(kw, seed=seed + 2)), 2)
    for s in ("validation", "test"):
        part = [it for it in items if split(it, s)]
        recs[s] = jsonl.records(tasks.build_questions(part, stage=2, think=False, **kw), 2)
    for n in names:
        jsonl.write_jsonl(recs[n], paths[n])
    return recs
