"""``python -m emit_jax.evaluate --checkpoint CKPT --data PATH [--parse emit|mmad] [options]``

Runs a model on multiple-choice anomaly-detection questions and prints the paper's Table 1
layout (a column per task, the average, question counts; EMIT's scoring: balanced accuracy for
anomaly discrimination, Object Structure/Details merged, per sub-dataset then averaged).

- ``--data`` an MMAD folder (``mmad.json`` + ``domain_knowledge.json`` + images): EMIT's MMAD
  protocol as the authors ran it (``evaluate_batch_mmad_choice.py``; docs/reference/emit.md 4,
  12 and docs/reference/mmad.md 5.3): one question per call; system message ``sysprompt.txt``;
  the ``internvl2_5`` ChatML template; ``<image>`` -> ``<img>`` + ``<IMG_CONTEXT>`` x 256 x tiles
  + ``</img>`` with no newline added (training adds one); AD and Defect* questions 1-shot
  (``similar_templates[0]``) with the class's domain knowledge, Object* 0-shot without it; CE +
  SP (``<COMP_CONTEXT>`` x 265 before the prompt's last ``<|im_end|>``) only for MVTec/VisA
  two-image questions with a trigger phrase. Greedy, **up to 1,024 new tokens** (their
  ``ds_collection``, also with ``--think``) and at least 1 (``<|im_end|>`` cannot come first);
  generation stops at ``<|im_end|>``, so direct answers cost a few tokens.
- ``--data`` an MVTec-AD-style folder: questions made by the task builder (the four tasks;
  ``--split`` picks from a ``splits.json``, default ``test``); up to 8 new tokens (512 with
  ``--think``), the fast default training's held-out evaluation also uses. Ask them as the model
  was trained: ``--domain-knowledge none`` leaves the folder's domain knowledge out (the main
  job's ``data.domain_knowledge=False``; a number keeps that many sentences per entry), and
  ``--ad-order yes_no`` lists anomaly discrimination's options as MMAD does, ``A. Yes.`` /
  ``B. No.`` (the main job's ``data.ad_order``; default ``shuffled``, EMIT's training rule).

``--max-new-tokens`` overrides either default. Answer parsing (``--parse``), to compare with
either paper's table:

- ``emit`` (default; EMIT's Table 1): with ``--think`` the content of the last
  ``<answer>...</answer>`` (else the whole response), then the *first* standalone capital A-E;
  no letter -> the option whose text is closest to the response (difflib).
- ``mmad`` (MMAD's query scripts, its published tables): the *last* standalone capital A-E of
  the whole response, never an ``<answer>`` extraction (also with ``--think``); no letter -> the
  closest option text, as MMAD's helper does when given the options. Only the parsing changes:
  the prompt stays EMIT's (MMAD's own baselines were asked with other prompts,
  docs/reference/mmad.md 5.2).

Known differences from the authors' run: ``--think`` decodes greedily too (they sample at
temperature 0.5, top-p 0.5 with 2 beams and no_repeat_ngram_size 4; beam search is not
implemented here), and questions go one at a time (they batch 4 with left padding).

``--checkpoint`` is a model folder (config.json + safetensors + tokenizer files): transformers'
layout, where an ``emit_extras.safetensors`` makes it an EMIT model, or the original
``internvl_chat`` layout, such as the authors' EMIT-8B as released (read with their constants,
``emit_jax.internvl_chat``); or an emit_jax Orbax model checkpoint
(tokenizer from its ``assets/``). Per-question answers go to ``--out`` as JSON (MMAD's
answers-file rows plus the raw response) with the settings (``parse``, ``max_new_tokens``,
``min_new_tokens``, ``think``), ``resumed`` (how many answers came from an earlier run's
``<out>.partial.jsonl``) and the table's numbers.

Interrupted and failing runs keep what they did:

- Every input is checked before the model is loaded: the question records (MMAD: the
  ``mmad.json`` / ``domain_knowledge.json`` shape and every prompt), and every image a question
  still to answer uses (it opens and passes PIL's ``verify``). A bad one is one line,
  ``emit_jax.evaluate: error: <file>: <problem>`` (exit 2), naming the first bad image and how
  many are bad.
- ``--out`` is one JSON file: a path ending with a separator or naming a folder is refused
  before any work. One that exists (a finished evaluation) is announced on stderr (``note:``
  line) before the first question; it stays as it is until the new results replace it whole.
  A checkpoint without tokenizer files (``python -m emit_jax.demo``'s folders) is refused in
  one line before its weights are read.
- With ``--out``, each answer is appended to ``<out>.partial.jsonl`` as soon as it is made (one
  fsynced line: the question's index, a fingerprint of its prompt and images, the raw response,
  the results row; a header line holds the settings). The file is removed once ``--out`` is
  written; until then it is what a rerun resumes from. When it also holds answers to questions
  past this run's (an earlier run with a larger ``--limit``) it is kept, with them, for a later
  run, and one ``note:`` line says so.
- An ``--out`` that exists is replaced only when it is an evaluate results file (announced by a
  ``note:`` line); any other file (a training workdir's ``results.json``...) is refused in one
  line, as is an ``--out`` or ``<out>.partial.jsonl`` that is not a regular file (a device, a
  pipe, a symbolic link), before the model is loaded.
- Rerunning the same command skips the questions answered in that file (a line torn by a kill
  is dropped) and writes the same results an uninterrupted run writes. The answers must come
  from the same checkpoint files, ``--think``, ``--max-new-tokens``, ``--max-tiles`` and
  decoding, for the same questions (a changed prompt, image path or data is noticed): otherwise
  the run is refused in one line. ``--restart`` starts over instead. ``--parse`` may change:
  the kept responses are parsed again.
- Ctrl-C (SIGINT) or SIGTERM during the questions stops after the question in progress:
  ``emit_jax.evaluate: interrupted after N of M questions; answers kept in <file>; rerun the same
  command to resume``, exit status 130, no traceback. Before the first question (reading the
  data, loading the model) and on a second signal the process ends at once, with the same line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import math
import os
import signal
import stat
import sys
import threading
import time
from typing import Mapping, Sequence

import numpy as np

from emit_jax import cli
from emit_jax.errors import (STOP_SIGNALS, CheckpointError, ConfigError, DataError, ImageError,
                             MMADError, show_path)
from emit_jax.fileio import (atomic_output, check_not_input, check_writable, finite_json,
                             missing_file, name_max, nearest_existing)
from emit_jax.data.tasks import AD_ORDERS

# jax and the models are imported where used: `python -m emit_jax.evaluate` handles SIGINT /
# SIGTERM from its first moments (main), not only after seconds of imports

MVTEC_TYPES = {"anomaly_discrimination": "Anomaly Detection",
               "defect_classification": "Defect Classification",
               "defect_localization": "Defect Localization",
               "object_classification": "Object Classification"}


def check_tokenizer_files(checkpoint: str, tok_dir: str) -> None:
    """Raise one :class:`~emit_jax.errors.TokenizerError` line when ``tok_dir`` (the checkpoint
    folder, or an Orbax checkpoint's ``assets/``) holds none of the tokenizer files
    (:data:`emit_jax.data.tokenizer.TOKENIZER_FILES`): the
    weights-only folders of ``python -m emit_jax.demo`` (a random model, no tokenizer)."""
    from emit_jax.data.tokenizer import TOKENIZER_FILES, has_tokenizer_files
    from emit_jax.errors import TokenizerError

    if has_tokenizer_files(tok_dir):
        return
    where = "in this checkpoint" if os.path.normpath(tok_dir) == os.path.normpath(checkpoint) \
        else f"in its {os.path.relpath(tok_dir, checkpoint)}/"
    raise TokenizerError(
        f"{checkpoint}: no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])} ...) {where}; "
        f"copy the model's tokenizer files into {tok_dir} (python -m emit_jax.demo writes "
        "none: its model is random, made without a tokenizer)")


def check_checkpoint(checkpoint: str) -> tuple[bool, str]:
    """The cheap checks of a checkpoint, before its weights are read: its config (a model
    folder's ``config.json``, an Orbax checkpoint's metadata) and that it has tokenizer files
    (:func:`check_tokenizer_files`). Returns ``(is a model folder, tokenizer folder)``."""
    from emit_jax import checkpoint as ckpt
    from emit_jax import hf

    # a config.json that is there but no file (a folder, a pipe) is said as such by read_config
    is_hf = os.path.lexists(os.path.join(checkpoint, "config.json"))
    if is_hf:
        hf.read_config(checkpoint)
    else:
        ckpt.read_meta(checkpoint)
    tok_dir = checkpoint if is_hf else ckpt.assets_dir(checkpoint)
    check_tokenizer_files(checkpoint, tok_dir)
    return is_hf, tok_dir


def load_for_eval(checkpoint: str, dtype: str | None = None):
    """(model, tokenizer) from a model folder (transformers or internvl_chat, e.g. the authors'
    EMIT-8B as released) or an Orbax model checkpoint."""
    from emit_jax import checkpoint as ckpt
    from emit_jax import hf
    from emit_jax.data.tokenizer import load_tokenizer
    from emit_jax.hf import CheckpointError

    # the cheap checks first (config, tokenizer), then the weights
    is_hf, tok_dir = check_checkpoint(checkpoint)
    tokenizer = load_tokenizer(tok_dir)
    if is_hf:
        model = hf.load(checkpoint, dtype=dtype)
    else:
        model, _ = ckpt.load_model(checkpoint, dtype=dtype)
    mcfg = model.config
    img_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if img_id != mcfg.image_token_id:
        raise CheckpointError(f"{tok_dir}: tokenizer's <IMG_CONTEXT> is id {img_id}, the model's "
                         f"image_token_id is {mcfg.image_token_id}")
    return model, tokenizer


#: EMIT's MMAD generation length (``ds_collection`` of ``evaluate_batch_mmad_choice.py``: max 1024,
#: min 1 new tokens, both modes; docs/reference/emit.md 12.2). Greedy decoding stops at
#: ``<|im_end|>``, so a model that answers with a letter pays for two or three tokens, not 1024.
MMAD_MAX_NEW_TOKENS = 1024
MMAD_MIN_NEW_TOKENS = 1
#: The fast default elsewhere (MVTec-style folders; training's held-out evaluation): a letter
#: needs a few tokens, a <think>...</think><answer>...</answer> response a few hundred.
FAST_MAX_NEW_TOKENS = {False: 8, True: 512}


def default_max_new_tokens(fmt: str, think: bool) -> int:
    """``--max-new-tokens`` when not given: :data:`MMAD_MAX_NEW_TOKENS` for an MMAD folder
    (``fmt="mmad"``, the authors' protocol), else :data:`FAST_MAX_NEW_TOKENS` (8, 512 with
    ``think``)."""
    return MMAD_MAX_NEW_TOKENS if fmt == "mmad" else FAST_MAX_NEW_TOKENS[bool(think)]


class Runner:
    """Greedy (or sampled) answers for (user text, image paths, use_comp) queries.

    The prompt is EMIT's evaluation prompt as the authors' ``batch_chat`` builds it
    (docs/reference/emit.md 4, 12.2): system message :data:`~emit_jax.data.tokenizer.SYSTEM_PROMPT`
    (``sysprompt.txt``), the ``internvl2_5`` ChatML template, each ``<image>`` replaced by
    ``<img>`` + ``<IMG_CONTEXT>`` x 256 x tiles + ``</img>`` with no added newline (evaluation;
    training adds one), and for an EMIT model with ``use_comp`` the soft-prompt + CE
    ``<COMP_CONTEXT>`` slots right before the prompt's last ``<|im_end|>``. Generation stops at
    ``<|im_end|>``; the response is decoded without special tokens and stripped.
    ``min_new_tokens``: EOS is not allowed before that many new tokens (EMIT's MMAD protocol: 1).
    """

    def __init__(self, model, tokenizer, *, max_tiles: int = 6, max_new_tokens: int = 16,
                 length_buckets=(256, 512, 1024, 2048, 4096, 8192, 16384), mesh=None,
                 min_new_tokens: int = 0):
        from emit_jax.models.emit import is_emit

        self.model, self.tok, self.mesh = model, tokenizer, mesh
        self.max_tiles, self.max_new_tokens = max_tiles, max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.buckets = length_buckets
        self.emit = is_emit(model)
        cfg = model.config
        self.size, self.per_tile = cfg.vision.image_size, cfg.tokens_per_tile
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context = cfg.text.max_position_embeddings
        # transformers' "Token indices sequence length is longer than ..." (a second line beside
        # answer()'s own error, naming a limit that is not the model's): the length is checked here
        import logging

        logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)

    def encode(self, text: str, images: list[str], use_comp: bool):
        """``(prompt ids, [tiles [n_i, 3, s, s] per image], CE pair [1, 2, 3, s, s] or None)``
        for one query (the class docstring's prompt)."""
        from emit_jax.data.image import load_image, preprocess, to_tile
        from emit_jax.data.tokenizer import encode_chat

        pil = [load_image(p) for p in images]
        tiles = [preprocess(im, self.size, self.max_tiles) for im in pil]
        comp = self.emit and use_comp
        enc = encode_chat(self.tok, text, tiles_per_image=[len(t) for t in tiles],
                          tokens_per_tile=self.per_tile, mode="eval",
                          comp_slots=self.model.num_comp_slots if comp else 0,
                          comp_token_id=self.model.emit_config.comp_token_id if comp else None)
        ce = np.stack([to_tile(pil[0], self.size), to_tile(pil[1], self.size)])[None] \
            if comp else None
        return enc["input_ids"], tiles, ce

    def answer(self, text: str, images: list[str], use_comp: bool) -> str:
        return self.answer_batch([(text, images, use_comp)])[0]

    def answer_batch(self, queries, rows: int | None = None) -> list[str]:
        """The responses to ``queries`` (``(text, image paths, use_comp)`` each), in order, from
        one ``generate`` call: the prompts left-padded to the longest one's length bucket, the
        tiles and CE pairs concatenated in order (questions with and without the contrastive
        pair may share a batch: the pairs fill the ``<COMP_CONTEXT>`` slots in order).
        ``rows`` > ``len(queries)`` pads the batch with copies of the last query (answers
        dropped), so every batch of a run has one shape.
        Greedy answers equal :meth:`answer`'s one by one (the padding is masked; up to the
        float rounding of a batched matmul, which can flip a near tie)."""
        import jax.numpy as jnp

        from emit_jax.ops.sampling import generate

        if not queries:
            return []
        encoded = []
        for text, images, use_comp in queries:
            ids, tiles, ce = self.encode(text, images, use_comp)
            self._check_length(ids, images)
            encoded.append((ids, tiles, ce))
        n = len(encoded)
        encoded += [encoded[-1]] * max(0, (rows or n) - n)
        L = max(next((b for b in self.buckets if b >= len(ids)), len(ids))
                for ids, _, _ in encoded)
        ids_ = np.full((len(encoded), L), self.pad, np.int32)
        mask = np.zeros((len(encoded), L), np.int32)
        for i, (ids, _, _) in enumerate(encoded):
            ids_[i, L - len(ids):] = ids
            mask[i, L - len(ids):] = 1
        tiles = [t for _, ts, _ in encoded for t in ts]
        pix = jnp.asarray(np.concatenate(tiles)) if tiles else None
        ces = [ce for _, _, ce in encoded if ce is not None]
        out = generate(self.model, ids_, mask, pix,
                       ce_pixels=jnp.asarray(np.concatenate(ces)) if ces else None,
                       max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                       eos_token_id=self.eos, pad_token_id=self.pad, mesh=self.mesh)
        lengths = np.asarray(out.lengths)
        logprobs, tokens = np.asarray(out.logprobs), np.asarray(out.tokens)
        answers = []
        for i, (_, images, _) in enumerate(queries):
            k = int(lengths[i])
            if not np.isfinite(logprobs[i, :k]).all():
                # (eighteenth probe X12: a broken config.json answered every question with
                # token 0, the NaN logits' argmax, in an evaluation that looked normal)
                raise CheckpointError(f"the model's output is not a number (NaN logits) on the "
                                      f"question on {images[-1] if images else 'no image'}: its "
                                      "weights or config.json are broken")
            answers.append(self.tok.decode(tokens[i, :k].tolist(),
                                           skip_special_tokens=True).strip())
        return answers

    def _check_length(self, ids, images) -> None:
        if len(ids) + self.max_new_tokens > self.context:  # before: an allocation failure
            room = self.context - len(ids)
            fix = (f"give --max-new-tokens {room:,} or fewer" if room > 0 else
                   "shorten the question (or its domain knowledge: --domain-knowledge)")
            raise ConfigError(f"the question on {images[-1] if images else 'no image'}: its "
                              f"prompt is {len(ids):,} tokens, which with --max-new-tokens "
                              f"{self.max_new_tokens:,} passes the model's context of "
                              f"{self.context:,} positions (max_position_embeddings); {fix}")


def mmad_queries(root: str, think: bool, limit: int | None):
    """The MMAD questions as a list of (text, images, use_comp, make_row, options); ``mmad.json``
    and ``domain_knowledge.json`` are read and checked, and every prompt made, now."""
    from emit_jax.data import mmad

    records = mmad.load_mmad(root)
    dk = mmad.load_domain_knowledge(root)
    out = []
    try:
        for k, prompt in enumerate(mmad.iter_prompts(records, dk, think=think)):
            if limit is not None and k >= limit:
                break
            out.append((prompt.text, prompt.images, prompt.use_comp,
                        (lambda ans, response, p=prompt: p.answer_row(ans, response=response)),
                        dict(prompt.question.options)))
    except MMADError as e:  # a class missing from the domain knowledge: name the file
        name = mmad.DOMAIN_KNOWLEDGE_JSON if "domain knowledge" in str(e) else mmad.MMAD_JSON
        raise MMADError(f"{os.path.join(root, name)}: {e}") from None
    return out


def parse_domain_knowledge(text: str) -> str:
    """``--domain-knowledge``: ``all``, ``none`` or a positive number of sentences."""
    if text in ("all", "none"):
        return text
    if text.isdigit() and int(text) > 0:
        return str(int(text))
    raise argparse.ArgumentTypeError(f"{text!r}: expected all, none or a number of sentences >= 1")


def mvtec_split(root: str, split: str | None) -> str:
    """The split ``--split`` names in the MVTec-style folder ``root``: as given, else ``test``
    where the folder has a ``splits.json``, else ``all`` (what :func:`mvtec_queries` asks)."""
    return split or ("test" if os.path.isfile(os.path.join(root, "splits.json")) else "all")


def mvtec_queries(root: str, think: bool, limit: int | None, split: str | None, seed: int,
                  domain_knowledge: str = "all", ad_order: str = "shuffled"):
    """The questions of an MVTec-style folder, built now (every image and mask read), with its
    ``domain_knowledge.json`` as :func:`parse_domain_knowledge` says."""
    from emit_jax.data import tasks
    from emit_jax.data.records import load_domain_knowledge
    from emit_jax.data.mvtec import Report, scan
    from emit_jax.models.emit import use_comp

    items = scan(root)
    has_splits = os.path.isfile(os.path.join(root, "splits.json"))
    split = mvtec_split(root, split)
    pool = None
    if split and split != "all":
        # queries from the split; references from the normal training images
        pool = (lambda it: it.split == "train") if has_splits else None
    queries = [it for it in items if not split or split == "all" or it.split == split]
    # every image the questions and their references read, checked at once: the first bad one
    # named with how many are bad (before: the first the task builder met, alone)
    check_images([it.path for it in queries] + [it.path for it in items
                                                if pool is None or pool(it)])
    refs = tasks.select_references(items, tasks.pixel_embedder(), pool=pool)
    if items and not queries:  # a --split the data does not have: name the ones it has
        have = ", ".join(sorted({it.split for it in items}))
        raise DataError(f"{root}: --split {split!r} matches no image; the data's splits are "
                        f"{have} (or 'all')")
    dk_path = os.path.join(root, "domain_knowledge.json")
    if domain_knowledge not in ("all", "none") and not os.path.lexists(dk_path):
        # (twenty-second probe E10: the flag had no effect, without a word)
        print(f"note: --domain-knowledge {domain_knowledge}: {root} has no domain_knowledge.json; "
              "the questions have no domain knowledge", file=sys.stderr)
    dk = load_domain_knowledge(dk_path if os.path.lexists(dk_path) else None, queries[0].dataset
                               if queries else None) if domain_knowledge != "none" else None
    report = Report()
    qs = tasks.build_questions(queries, stage=2, seed=seed, references=refs, domain_knowledge=dk,
                               think=think, report=report, ad_order=ad_order,
                               dk_sentences=0 if domain_knowledge in ("all", "none")
                               else int(domain_knowledge))
    report.say_notes()
    out = []
    for k, q in enumerate(qs):
        if limit is not None and k >= limit:
            break
        key = f"{q.meta['dataset']}/{os.path.relpath(q.images[-1], root)}"
        options = {chr(65 + i): o for i, o in enumerate(q.options)}

        def row(ans, response, q=q, key=key, options=options):
            return {"image": key, "question": {"type": "text", "text": q.user},
                    "question_type": MVTEC_TYPES[q.task], "options": options,
                    "correct_answer": q.answer, "gpt_answer": ans, "response": response}
        out.append((q.user, list(q.images), use_comp(len(q.images), q.user, mode="train"), row,
                    options))
    return out


def _record_answers(runner: Runner, records, limit: int | None, batch: int = 1):
    """``(record, greedy response)`` for the first ``limit`` JSONL records (all when None), in
    order. ``batch`` > 1: the records grouped by their shape (with or without the contrastive
    pair, how many images), ``batch`` questions of a group per ``generate`` call
    (:meth:`Runner.answer_batch`), each group's last batch padded to ``batch`` rows (to a
    multiple of the mesh's batch shards with ``runner.mesh``), so a run compiles one program per
    shape; the answers come when every batch is done."""
    from emit_jax.models.emit import use_comp

    if batch < 1:
        raise ValueError(f"batch {batch}: must be >= 1")
    records = records if limit is None else itertools.islice(records, limit)

    def query(rec):
        text = rec["messages"][0]["content"]
        return text, rec["images"], use_comp(len(rec["images"]), text)

    if batch == 1:  # one at a time, as they come
        for rec in records:
            yield rec, runner.answer(*query(rec))
        return
    records = list(records)
    queries = [query(rec) for rec in records]
    rows = batch
    if runner.mesh is not None:  # whole batch shards
        from emit_jax.parallel import BATCH_AXES

        shards = math.prod(runner.mesh.shape[a] for a in BATCH_AXES)
        rows = -(-batch // shards) * shards
    groups: dict = {}
    for i, (_, images, comp) in enumerate(queries):
        groups.setdefault((comp, len(images)), []).append(i)
    answers: list = [None] * len(records)
    for idx in groups.values():
        for k in range(0, len(idx), batch):
            chunk = idx[k:k + batch]
            for i, a in zip(chunk, runner.answer_batch([queries[i] for i in chunk], rows=rows)):
                answers[i] = a
    yield from zip(records, answers)


def evaluate_records(model, tokenizer, records, *, limit: int | None = None, max_tiles: int = 1,
                     max_new_tokens: int = 8, think: bool = False, root: str | None = None,
                     mesh=None, batch: int = 1):
    """Greedy answers for EMIT JSONL records (``solution``, ``options``, ``task_type``) ->
    (Summary, rows), ``batch`` questions per generation (:func:`_record_answers`). Used for
    held-out accuracy during training."""
    from emit_jax.eval.scoring import parse_answer, summarize

    runner = Runner(model, tokenizer, max_tiles=max_tiles, max_new_tokens=max_new_tokens, mesh=mesh)
    rows = []
    for rec, response in _record_answers(runner, records, limit, batch):
        options = {chr(65 + i): o for i, o in enumerate(rec.get("options", []))}
        query = rec.get("query") or rec["images"][-1]
        key = f"{rec.get('dataset', 'data')}/{os.path.relpath(query, root) if root else query}"
        rows.append({"image": key, "question_type": MVTEC_TYPES[rec["task_type"]],
                     "correct_answer": rec.get("solution"), "options": options,
                     "gpt_answer": parse_answer(response, options, think=think),
                     "response": response})
    return summarize(rows), rows


def evaluate_adfm(model, tokenizer, records, *, limit: int | None = None, max_tiles: int = 1,
                  max_new_tokens: int = 64, mesh=None, batch: int = 1) -> tuple[dict, list[dict]]:
    """Greedy AD-FM answers for AD-FM records (:mod:`emit_jax.data.adfm`) -> (summary, rows).

    summary: ``accuracy`` (% of records with R_cls = 1), ``balanced_accuracy`` (mean of the
    anomalous and normal recalls, MMAD's AD metric; NaN unless both kinds are asked),
    ``mean_iou`` (anomalous records with GT boxes: :func:`emit_jax.rl.adfm.localization_iou`
    of the well-formed boxes in ``<think>`` against the GT, one-to-one, over ``max(m, n)``;
    x 100), ``hit_rate`` (% of those records
    with a predicted box of IoU >= 0.1 to some GT box, docs/reference/adfm.md 5.5), ``boxes_per_answer``
    and the counts."""
    from emit_jax.rl import adfm as A

    runner = Runner(model, tokenizer, max_tiles=max_tiles, max_new_tokens=max_new_tokens, mesh=mesh)
    rows = []
    for rec, response in _record_answers(runner, records, limit, batch):
        pred = A.parse_boxes(A.think_content(response) or "", ordered_only=True)
        gt = [list(b) for b in rec.get("bbox_answer") or []]
        rows.append({"query": rec.get("query") or rec["images"][-1], "solution": rec["solution"],
                     "response": response, "correct": A.is_correct(response, rec["solution"]),
                     "pred_boxes": [list(b) for b in pred], "bbox_answer": gt,
                     "iou": A.localization_iou(pred, gt) if gt else None,
                     "hit": bool(gt) and any(A.iou(p, g) >= 0.1 for p in pred for g in gt)})
    anomalous = [r for r in rows if A.normalize_gt(r["solution"]) == "a"]
    normal = [r for r in rows if A.normalize_gt(r["solution"]) == "b"]
    located = [r for r in rows if r["iou"] is not None]

    def pct(xs):
        return 100.0 * float(np.mean(xs)) if len(xs) else float("nan")
    recalls = [pct([r["correct"] for r in part]) for part in (anomalous, normal) if part]
    summary = {"questions": len(rows), "anomalous": len(anomalous), "normal": len(normal),
               "accuracy": pct([r["correct"] for r in rows]),
               # both recalls, or undefined (twenty-second probe AD1: 0.0 with no normal one)
               "balanced_accuracy": float(np.mean(recalls)) if len(recalls) == 2
               else float("nan"),
               "mean_iou": pct([r["iou"] for r in located]),
               "hit_rate": pct([r["hit"] for r in located]), "located": len(located),
               "boxes_per_answer": float(np.mean([len(r["pred_boxes"]) for r in rows]))
               if rows else float("nan")}
    return summary, rows


class EvaluationInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped :func:`evaluate` between two questions (or before the first);
    the message is the one line the command prints (how many were answered, where they are)."""


class Signals:
    """How ``python -m emit_jax.evaluate`` meets SIGINT (Ctrl-C) and SIGTERM (main thread only;
    a signal the process was started to ignore stays ignored; :meth:`restore` puts the previous
    handlers back).

    While nothing needs finishing (reading the data, checking the images, loading the model)
    a signal prints :meth:`message` and ends the process at once with ``os._exit(130)``: there
    is nothing to save, and no ``KeyboardInterrupt`` is raised into JAX or an import while its
    threads run (Python's teardown after one segfaulted). While :attr:`defer` is set (the
    question loop, then writing the results) the first signal only sets :attr:`requested`: the
    loop stops after the question in progress and :func:`evaluate` raises
    :class:`EvaluationInterrupted`, so the process ends by a normal return; a second signal ends
    it at once (every answered question is on disk already; a line torn by the exit is dropped
    on resume). :attr:`stopped` says how far the run got and what it keeps, ``(when, left)`` of
    the line every command prints when interrupted (:func:`emit_jax.cli.interrupted_line`)."""

    def __init__(self, prog: str = "emit_jax.evaluate"):
        self.prog = prog
        self.defer = False
        self.requested = False
        self.done = False  # the results are written and shown: a signal says the run finished
        self.stopped = lambda: ("before the first question", "nothing to keep")
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.old[s] = signal.signal(s, self._on_signal)

    def message(self, again: str = "") -> str:
        """The one line: ``emit_jax.evaluate: interrupted after 3 of 10 questions; answers kept
        in ...``."""
        when, left = self.stopped()
        return cli.interrupted_line(self.prog, when, left + again)

    def _on_signal(self, signum, frame):
        if self.done:  # (SG3: before, "nothing half-written is left" of a complete results file)
            cli.ended(self.prog, signal.Signals(signum).name, 0)
        if self.defer and not self.requested:
            self.requested = True
            return
        cli.exit_interrupted(self.message(" (a second signal: stopped at once)"
                                          if self.requested else ""))

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self.old = {}
        if self.done:  # the command's own process: from here on too (cli.finished)
            cli.finished(self.prog)


def _image_problem(path: str) -> str | None:
    """None when ``path`` opens as an image and passes PIL's ``verify`` (the header, and for
    PNG every chunk's checksum, without decoding the pixels); else the problem in words."""
    from PIL import Image, UnidentifiedImageError

    from emit_jax.data.image import not_regular

    if problem := not_regular(path):  # a pipe would block the check
        return problem
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except FileNotFoundError:
        return missing_file(path)
    except UnidentifiedImageError as e:
        return f"not a readable image ({e})"
    except OSError as e:
        return f"cannot read ({e.strerror})" if e.strerror else f"not a readable image ({e})"
    except Exception as e:  # SyntaxError (a broken PNG), a decompression bomb...
        return f"not a readable image ({e or type(e).__name__})"


def results_path(text: str) -> str:
    """``--out``'s argparse ``type``: a file name. Refused: the empty string (an unset shell
    variable; it used to mean no results file, the answers lost without a word) and ``-``
    (which reads as stdout, and wrote a file named ``-``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; name the results file (or leave --out out "
                                         "to print the summary only)")
    if text == "-":
        raise argparse.ArgumentTypeError("'-': the results are a JSON file, not standard output; "
                                         "name the file")
    return text


def check_images(paths) -> None:
    """Raise one :class:`~emit_jax.errors.ImageError` naming the first of ``paths`` (in order)
    that is missing or not a readable image (:func:`_image_problem`), with the number of bad
    ones when there are several. The files are checked in parallel (threads: the work is I/O)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = list(dict.fromkeys(paths))
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        problems = list(pool.map(_image_problem, paths))
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    if bad:
        path, why = bad[0]
        more = f" ({len(bad)} of the {len(paths)} images are bad; this is the first)" \
            if len(bad) > 1 else ""
        raise ImageError(f"{path}: {why}{more}")


def _not_regular(path: str) -> str | None:
    """None when nothing is at ``path`` (``os.lstat``: a link is not followed) or it is a
    regular file or a folder; else what it is in words (a device, a pipe, a symbolic link...)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # a path through a link loop, or too long to name
        if e.errno == errno.ENAMETOOLONG:  # nothing is there: said when it is written
            return None
        return f"cannot be looked at: {e.strerror or e}"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a pipe" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a file")


def check_out_is_a_file(out: str) -> None:
    """Refuse, in one line before any work, an ``--out`` that names a folder (it ends with a
    path separator, or is an existing folder): evaluate writes one JSON file there (and
    ``<out>.partial.jsonl`` beside it); and an ``--out`` or partial-answers file that exists and
    is not a regular file (a device such as ``/dev/null``, a pipe, a symbolic link, a link loop:
    ``os.lstat``), which writing the results would replace."""
    from emit_jax.eval import partial

    out = os.fspath(out)
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if out.endswith(seps) or os.path.isdir(out):
        raise ConfigError(f"--out {out}: names a folder; evaluate writes one JSON file (e.g. "
                          f"{os.path.join(out, 'results.json')})")
    what = _not_regular(out)
    if what:
        raise ConfigError(f"--out {out}: exists and is not a regular file ({what}); choose "
                          "another path")
    if out.endswith(partial.SUFFIX):  # (seventeenth probe E12: it then blocked that --out)
        raise ConfigError(f"--out {out}: the name of another --out's partial-answers file "
                          f"(<out>{partial.SUFFIX}); choose a name that does not end so")
    answers_path = partial.path_for(out)
    longest = name_max(nearest_existing(os.path.dirname(os.path.abspath(out))))
    if len(os.fsencode(os.path.basename(answers_path))) > longest:  # before: "exists and is not
        # a regular file (cannot be looked at: File name too long)", of a file that is not there
        raise ConfigError(f"--out {out}: its partial-answers file's name "
                          f"({os.path.basename(out)}{partial.SUFFIX}) would be longer than the "
                          f"file system's {longest} bytes; choose a shorter --out")
    what = _not_regular(answers_path)
    if what is None and os.path.isdir(answers_path):
        what = "a folder"
    if what:
        raise ConfigError(f"--out {out}: its partial-answers file {answers_path} exists and is "
                          f"not a regular file ({what}); choose another --out")


def _results_file(out: str) -> dict | None:
    """The content of ``out`` when it is an evaluate results file (a JSON object with the
    ``answers`` list and the ``questions`` count); else None."""
    try:
        with open(out, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(old, dict) and isinstance(old.get("answers"), list) and "questions" in old:
        return old
    return None


def check_out_replaceable(out: str) -> None:
    """Refuse, in one line once the inputs are checked and before the model is loaded (or
    anything written), an ``--out`` that exists and is not an evaluate
    results file (:func:`_results_file`): a training workdir's ``results.json``, any other JSON
    or file. Evaluate replaces only its own results; the file is left as it is."""
    out = os.fspath(out)
    if os.path.lexists(out) and _results_file(out) is None:
        raise ConfigError(f"--out {out}: exists and is not an evaluate results file; choose "
                          "another path (or remove it)")


def _asked(row: Mapping) -> str:
    """What a results row was asked: its image, question (prompt text) and options."""
    return json.dumps([row.get("image"), row.get("question"), row.get("options")],
                      sort_keys=True, default=str)


def replaced_results(out: str, checkpoint: str, data: str, asked: Sequence[Mapping]) -> str:
    """What the existing file ``out`` is, in the words of the notice that it will be replaced:
    a finished evaluation (its number of questions, and whether it was made from the same
    checkpoint and data and asked the same questions as ``asked``, this run's rows: image,
    prompt, options), or another file (which :func:`check_out_replaceable` refuses)."""
    old = _results_file(out)
    if old is not None:
        answers = old.get("answers") if isinstance(old.get("answers"), list) else []
        same = (old.get("checkpoint") == checkpoint and old.get("data") == data
                and [_asked(a) if isinstance(a, Mapping) else None for a in answers]
                == [_asked(r) for r in asked])
        n = old["questions"]
        what = (f"a finished evaluation, {n} question{'' if n == 1 else 's'}"
                + (", same checkpoint, data and questions" if same else ""))
    else:
        what = "not an evaluate results file"
    return (f"--out {out} exists ({what}); it will be replaced when this run finishes (it stays "
            "as it is until then)")


class Progress:
    """A line every ``every`` seconds while questions are answered (eighteenth probe: an
    hour-long evaluation said nothing until its table): ``N of M questions answered (R/s,
    about T left)``. Quick runs (under ``every`` seconds) print none."""

    def __init__(self, total: int, note, every: float = 30.0):
        self.total, self.note, self.every = total, note, every
        self.n, self.t0 = -1, time.monotonic()
        self.last = self.t0

    def tick(self) -> None:
        """Called before each question; ``self.n`` questions are answered."""
        self.n += 1
        now = time.monotonic()
        if self.n and now - self.last >= self.every:
            self.last = now
            rate = self.n / (now - self.t0)
            left = (self.total - self.n) / rate
            self.note(f"emit_jax.evaluate: {self.n} of {self.total} questions answered "
                      f"({rate:.2f}/s, about {_duration(left)} left)")


def _duration(seconds: float) -> str:
    m = int(seconds // 60)
    return f"{m // 60} h {m % 60} min" if m >= 60 else f"{m} min" if m else f"{int(seconds)} s"


def evaluate(checkpoint: str, data: str, *, limit: int | None = None, out: str | None = None,
             think: bool = False, max_tiles: int = 6, max_new_tokens: int | None = None,
             split: str | None = None, seed: int | None = None, parse: str = "emit",
             restart: bool = False,
             domain_knowledge: str = "all", ad_order: str = "shuffled", log=print, note=None,
             signals: Signals | None = None) -> dict:
    """Answer every question of ``data`` with the model of ``checkpoint``, print the table and
    return (and write to ``out``) the results: the module docstring's protocol. ``parse``:
    ``"emit"`` or ``"mmad"`` (:func:`emit_jax.eval.scoring.parse_response`).
    ``max_new_tokens=None``: :func:`default_max_new_tokens`. ``domain_knowledge`` (an
    MVTec-style folder): ``"all"``, ``"none"`` or a number of sentences per entry, to ask as
    the model was trained (the main job's config: ``none``).

    Every input is checked before the model is loaded (the questions, every image they use).
    With ``out``, each answer is appended to ``<out>.partial.jsonl`` as it is made
    (:mod:`emit_jax.eval.partial`) and the questions answered there already are not asked again
    (``restart=True`` starts that file over); it is removed once ``out`` is written, unless it
    holds answers to questions past this run's (a smaller ``limit``): then it is kept and
    ``note`` says so. An ``out`` that ends with a path separator or is a folder, that exists
    and is not an evaluate results file, or (or its partial file) that exists and is not a
    regular file is refused; one that exists already (a finished evaluation) is announced by ``note`` (default: a line on stderr) before the
    first question, and replaced only when the new results are complete.
    ``signals`` (the command's :class:`Signals`): a signal stops the run after the question in
    progress with :class:`EvaluationInterrupted`; without it a ``KeyboardInterrupt`` simply
    propagates."""
    from emit_jax.eval import partial
    from emit_jax.eval.scoring import PARSE_MODES, format_table, parse_response, summarize

    note = note or (lambda line: print(line, file=sys.stderr))

    # bad input fails before the model is loaded: the arguments, the output paths, the data
    if parse not in PARSE_MODES:
        raise ConfigError(f"parse must be one of {', '.join(PARSE_MODES)}, got {parse!r}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if os.path.exists(checkpoint) and not os.path.isdir(checkpoint):
        raise CheckpointError(f"{checkpoint}: a file, not a folder; --checkpoint takes a model "
                              "checkpoint or model folder")
    answers_path = partial.path_for(out) if out else None
    if out:
        check_out_is_a_file(out)
        for path in (out, answers_path):
            check_not_input(path, {"--data": data, "--checkpoint": checkpoint})
            check_writable(path)
    if os.path.isfile(data) and os.path.basename(data) == "mmad.json":
        # (twenty-fourth probe MM2: MMAD's own scripts take the file; the line named only the
        # MVTec layout)
        raise DataError(f"{show_path(data)}: a file; --data takes the MMAD folder that holds it "
                        f"(--data {show_path(os.path.dirname(os.path.abspath(data)))}), whose "
                        "image paths mmad.json names")
    is_mmad = os.path.lexists(os.path.join(data, "mmad.json"))  # a folder there: one line too
    fmt = "mmad" if is_mmad else "mvtec"
    # the flags that build an MVTec-style folder's questions (before: ignored on MMAD's)
    for flag, value, given in (("--split", split, split is not None),
                               ("--seed", seed, seed is not None),
                               ("--domain-knowledge", domain_knowledge, domain_knowledge != "all"),
                               ("--ad-order", ad_order, ad_order != "shuffled")):
        if is_mmad and given:
            raise ConfigError(f"{flag} {value}: only for an MVTec-style folder ({data} is an "
                              "MMAD folder: its questions, prompts and options are fixed)")
    max_new_tokens = max_new_tokens or default_max_new_tokens(fmt, think)
    min_new_tokens = min(MMAD_MIN_NEW_TOKENS, max_new_tokens) if is_mmad else 0
    try:
        queries = mmad_queries(data, think, limit) if is_mmad else \
            mvtec_queries(data, think, limit, split, seed or 0, domain_knowledge, ad_order)
    except DataError as e:  # (nineteenth probe N11: an MMAD folder without its mmad.json was
        if is_mmad or "no class folders" not in str(e):  # told only of MVTec's layout)
            raise
        raise DataError(f"{e}, nor an mmad.json (an MMAD folder has one at its top)") from None
    if not queries:
        raise DataError(f"{data}: no questions to evaluate")
    total = len(queries)
    digests: dict[str, str] = {}  # an image's contents, read once (references repeat)

    def digest(p: str) -> str:
        from emit_jax.data.image import not_regular

        if p not in digests:
            try:  # a pipe is never read (check_images below says what is wrong with it)
                digests[p] = "" if not_regular(p) else partial.file_digest(p)
            except OSError:  # missing or unreadable: check_images below says which
                digests[p] = ""
        return digests[p]

    fps = [partial.fingerprint(text, [os.path.relpath(p, data) for p in images], comp,
                               [digest(p) for p in images])
           for text, images, comp, _, _ in queries] if answers_path else []
    run_settings = partial.settings(checkpoint=checkpoint, think=think,
                                    max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                    decoding="greedy", max_tiles=max_tiles,
                                    questions=None if is_mmad else {
                                        "split": mvtec_split(data, split), "seed": seed or 0,
                                        "domain_knowledge": domain_knowledge,
                                        "ad_order": ad_order})
    done, keep, seen, beyond = {}, 0, None, 0
    if answers_path:
        partial.check_is_ours(answers_path)  # another file there: not ours to resume or restart
        partial.check_not_locked(answers_path)  # another run answering into it: refused now
        seen = partial.identity(answers_path)
    if answers_path and not restart:
        # beyond: answers to questions past this run's (a smaller --limit), kept in the file
        done, keep, beyond = partial.read_all(answers_path, run_settings, fps)
        if keep and os.path.getsize(answers_path) > keep:  # (28th probe: dropped without a word)
            log(f"note: {answers_path}: its last line was cut off (an interrupted write); that "
                "answer is asked again")
    todo = [k for k in range(total) if k not in done]
    check_images(p for k in todo for p in queries[k][1])
    if done:
        log(f"resuming from {answers_path}: {len(done)} of {total} questions answered already, "
            f"{len(todo)} to go")
    if todo:  # the checkpoint's config and tokenizer files, before the notice below
        check_checkpoint(checkpoint)
    if out and os.path.lexists(out):  # every check passed: the run goes ahead
        check_out_replaceable(out)  # unless it is another file (a training workdir's results)
        asked = [make_row(None, "") for _, _, _, make_row, _ in queries]
        note(f"emit_jax.evaluate: note: {replaced_results(out, checkpoint, data, asked)}")

    def kept() -> str:
        if not answers_path:
            return "answers not kept (--out keeps them, to resume)"
        if not done:
            return "nothing to keep"
        return f"answers kept in {answers_path}; rerun the same command to resume"

    if signals is not None:
        signals.stopped = lambda: (f"after {len(done)} of {total} questions", kept())
    t0 = time.time()
    if todo:
        model, tokenizer = load_for_eval(checkpoint)
        context = model.config.text.max_position_embeddings
        if max_new_tokens >= context:  # before: hours of answers, then an allocation failure
            raise ConfigError(f"--max-new-tokens {max_new_tokens}: does not fit the model's "
                              f"context ({checkpoint} holds {context:,} positions, "
                              "max_position_embeddings, the prompt included)")
        model.eval()
        runner = Runner(model, tokenizer, max_tiles=max_tiles, max_new_tokens=max_new_tokens,
                        min_new_tokens=min_new_tokens)
        writer = partial.Writer(answers_path, partial.header(checkpoint, data, run_settings),
                                keep, expect=seen) if answers_path else contextlib.nullcontext()
        with writer:
            if signals is not None:
                signals.defer = True  # from here on a signal waits for the question in progress
            progress = Progress(len(todo), note)
            for k in todo:
                progress.tick()
                if signals is not None and signals.requested:
                    raise EvaluationInterrupted(signals.message())
                text, images, comp, make_row, options = queries[k]
                try:
                    response = runner.answer(text, images, comp)
                except ImageError as e:  # readable by verify(), not by a full decode
                    raise ImageError(f"{e}; {kept()}") from None
                except CheckpointError as e:
                    raise CheckpointError(f"{checkpoint}: {e}; {kept()}") from None
                if answers_path:
                    writer.write(k, fps[k], response, make_row(
                        parse_response(response, options, parse=parse, think=think), response))
                done[k] = response
    if signals is not None:
        signals.defer = True  # all answered: a first signal lets the results be written
    rows = []
    for k, (text, images, comp, make_row, options) in enumerate(queries):
        rows.append(make_row(parse_response(done[k], options, parse=parse, think=think),
                             done[k]))
    summary = summarize(rows)
    empty = sum(1 for k in range(len(queries)) if not done[k].strip())
    if empty:  # (eighteenth probe E22: a model that said nothing scored as "0 invalid")
        note(f"note: {empty} of {len(queries)} responses are empty; {parse.upper()}'s answer "
             "parsing picks an option for each (its fallback: option A), so the table counts "
             "them as answers, not as invalid ones")
    table = format_table(summary, title=f"{os.path.basename(os.path.normpath(data))} "
                         f"({'MMAD' if is_mmad else 'MVTec-style'}, {len(rows)} questions, "
                         f"{parse.upper()}'s answer parsing)")
    result = {"checkpoint": checkpoint, "data": data, "format": fmt, "think": think,
              "parse": parse, "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
              "decoding": "greedy", "max_tiles": max_tiles,
              **({} if is_mmad else {"domain_knowledge": domain_knowledge, "ad_order": ad_order}),
              "questions": len(rows),
              "resumed": total - len(todo), "seconds": time.time() - t0,
              "average": summary.average, "per_group": summary.accuracy, "answers": rows}
    if not is_mmad and split is None and mvtec_split(data, None) == "all" and any(
            f"{os.sep}train{os.sep}" in f"{os.sep}{a.get('image', '')}" for a in rows):
        # said once the answers are in (seventeenth probe S3: train/good scored without a word)
        note(f"note: {data} has no splits.json: every image was asked, train/ included; "
             "--split test asks only its test/ images")
    if out:
        with atomic_output(out) as f:
            json.dump(finite_json(result), f, indent=1, default=str)
        if beyond:  # answers this run did not ask for: the file stays, for a later run
            note(f"emit_jax.evaluate: note: {beyond} answer{'' if beyond == 1 else 's'} beyond "
                 f"--limit {'is' if beyond == 1 else 'are'} kept in {answers_path} for a later "
                 "run")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(answers_path)
    log(table)  # after the results are safe: a standard output that fails loses nothing
    if signals is not None:
        signals.done = True
    return result


def main(argv=None) -> int:
    signals = Signals()  # first: Ctrl-C while the modules load is one line too, not a traceback
    try:
        return _main(argv, signals)
    except EvaluationInterrupted as e:
        print(e, file=sys.stderr)
        return cli.INTERRUPTED
    finally:
        signals.restore()


def _main(argv, signals: Signals) -> int:
    from emit_jax.eval.scoring import PARSE_MODES

    p = cli.Parser(prog="python -m emit_jax.evaluate", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter, error_type=ConfigError)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="MMAD folder or MVTec-AD-style folder")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="first N questions only")
    p.add_argument("--out", default=None, type=results_path,
                   help="per-question answers + summary (JSON); until it is written, the "
                   "answers so far are kept in <out>.partial.jsonl, which a rerun resumes from")
    p.add_argument("--think", action="store_true", help="<think>/<answer> instruction (and, with "
                   "--parse emit, <answer> extraction)")
    p.add_argument("--parse", choices=PARSE_MODES, default="emit",
                   help="answer parsing: emit (default, EMIT's: with --think the last <answer>, "
                   "then the FIRST standalone A-E) or mmad (MMAD's query scripts: the LAST "
                   "standalone A-E, no <answer> extraction); both fall back to the closest option "
                   "text when there is no letter")
    p.add_argument("--max-tiles", type=cli.int_in(1, cli.MAX_TILES), default=6)
    p.add_argument("--max-new-tokens", type=cli.int_in(1, cli.MAX_TOKENS), default=None,
                   help=f"default: {MMAD_MAX_NEW_TOKENS} for an MMAD folder (the authors' "
                   f"protocol, min {MMAD_MIN_NEW_TOKENS}), else {FAST_MAX_NEW_TOKENS[False]} "
                   f"({FAST_MAX_NEW_TOKENS[True]} with --think)")
    p.add_argument("--split", default=None, type=cli.nonempty,
                   help="MVTec-style: split from splits.json (default test), or the folder's "
                        "train / test without one (default: all images)")
    p.add_argument("--seed", type=cli.nonneg_int, default=None,
                   help="MVTec-style: the seed of the questions' option orders (default 0)")
    p.add_argument("--domain-knowledge", type=parse_domain_knowledge, default="all",
                   metavar="all|none|N", help="MVTec-style: the folder's domain_knowledge.json "
                   "in each prompt: all of it (default, as EMIT), none (as the main job's tiny "
                   "model is trained: data.domain_knowledge=False), or its first N sentences "
                   "per entry (data.dk_sentences)")
    p.add_argument("--ad-order", choices=AD_ORDERS, default="shuffled",
                   help="MVTec-style: anomaly discrimination's two options in a random order per "
                   "question (default, EMIT's training data) or always A. Yes. / B. No. (yes_no: "
                   "as MMAD asks, and the main job's data.ad_order)")
    p.add_argument("--restart", action="store_true",
                   help="start over: ignore (and replace) the answers an earlier, unfinished run "
                   "of the same --out kept in <out>.partial.jsonl; without it a rerun resumes "
                   "from them, and refuses them if they were made with other settings")
    a = p.parse_args(argv)
    if a.restart and a.out is None:  # before: accepted without a word
        raise ConfigError("--restart: only with --out (it starts over the answers kept in "
                          "<out>.partial.jsonl; without --out none are kept)")

    evaluate(a.checkpoint, a.data, limit=a.limit, out=a.out, think=a.think, max_tiles=a.max_tiles,
             max_new_tokens=a.max_new_tokens, split=a.split, seed=a.seed, parse=a.parse,
             restart=a.restart, domain_knowledge=a.domain_knowledge, ad_order=a.ad_order,
             signals=signals)
    return 0


if __name__ == "__main__":
    cli.command(main, prog="emit_jax.evaluate")
