"""tensorflow-datasets builders for EMIT's data, prepared once as ArrayRecord files and read back
randomly through ``tfds.data_sources`` into grain (no TensorFlow needed: images are stored as
their original encoded bytes and decoded by the grain pipeline).

- ``emit_iad``: EMIT's training/evaluation questions built by the task builder from an
  MVTec-AD-style dataset. Configs ``stage1`` / ``stage2``. Manual download: pass the local
  dataset folder as ``manual_dir`` (``download_config=tfds.download.DownloadConfig(manual_dir=
  ...)``); with no ``manual_dir`` it uses the embedded default dataset (built on first use).
  Splits ``train`` / ``validation`` / ``test`` when the source has a ``splits.json``, else
  ``train``.
- ``mmad``: the MMAD benchmark's questions with EMIT's evaluation prompts; ``manual_dir`` is a
  local MMAD copy (``mmad.json``, ``domain_knowledge.json``, images). Split ``test``.

Each example: ``record`` (the EMIT JSONL record as JSON text; image paths relative to the source)
and ``images`` (the encoded image files, in the record's order).

    builder = EmitIAD(config="stage2", data_dir=DIR)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MVTEC))
    source = builder.as_data_source()["train"]      # random access, len(source)
    records = TfdsRecords(source)                   # -> dicts for emit_jax.data.pipeline
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

_FEATURES = lambda: tfds.features.FeaturesDict({  # noqa: E731
    "record": tfds.features.Text(),
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
})


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _example(record: dict, root: str) -> dict:
    rec = dict(record)
    rec["images"] = [os.path.relpath(p, root) for p in record["images"]]
    return {"record": json.dumps(rec, ensure_ascii=False),
            "images": [_read_bytes(p) for p in record["images"]]}


class EmitIAD(tfds.core.GeneratorBasedBuilder):
    """EMIT's four-task questions from an MVTec-AD-style dataset (or the embedded default)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="stage1", description="AD + DL, direct answers"),
                       tfds.core.BuilderConfig(name="stage2", description="four tasks, think format")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at a local MVTec-AD-style folder (<class>/train/good, <class>/test/<defect>, "
        "<class>/ground_truth/<defect>/*_mask.png). Without manual_dir the embedded default dataset "
        "is used.")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=_FEATURES(),
                                     description=__doc__.split("\n\n")[0])

    def _source(self, dl_manager) -> str:
        manual = getattr(dl_manager, "_manual_dir", None)
        if manual and os.path.isdir(os.fspath(manual)) and os.listdir(os.fspath(manual)):
            return os.fspath(manual)
        from emit_jax.data.embedded import ensure_cached

        return ensure_cached()

    def _split_generators(self, dl_manager):
        source = self._source(dl_manager)
        splits = ["train", "validation", "test"] \
            if os.path.isfile(os.path.join(source, "splits.json")) else ["train"]
        return {s: self._generate_examples(source, s) for s in splits}

    def _generate_examples(self, source: str, split: str):
        import tempfile

        from emit_jax.data import jsonl
        from emit_jax.data.records import build

        stage = 1 if self.builder_config.name == "stage1" else 2
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "data.jsonl")
            build(source, out, stage, split=split if split != "train" or
                  os.path.isfile(os.path.join(source, "splits.json")) else None)
            for rec in jsonl.read_jsonl(out):
                yield rec["id"], _example(rec, source)


class Mmad(tfds.core.GeneratorBasedBuilder):
    """MMAD questions with EMIT's evaluation prompts (manual download)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at a local MMAD copy: mmad.json, domain_knowledge.json and the image folders.")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=_FEATURES(),
                                     description="MMAD with EMIT's evaluation prompts")

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {"test": self._generate_examples(root)}

    def _generate_examples(self, root: str):
        from emit_jax.data import mmad

        records = mmad.load_mmad(root)
        dk = mmad.load_domain_knowledge(root)
        for k, p in enumerate(mmad.iter_prompts(records, dk)):
            q = p.question
            rec = {"id": f"{q.image}#{q.index}", "images": p.images,
                   "messages": [{"role": "user", "content": p.text}], "solution": q.answer,
                   "question_type": q.type, "options": dict(q.options), "image": q.image,
                   "use_comp": p.use_comp}
            yield rec["id"], _example(rec, root)


class TfdsRecords(Sequence):
    """A tfds data source (random access) as EMIT records with ``image_bytes`` attached, ready
    for :func:`emit_jax.data.pipeline.make_dataset`."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        ex = self.source[i % len(self)]
        text = ex["record"]
        rec = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
        rec["image_bytes"] = [bytes(b) for b in ex["images"]]
        return rec
