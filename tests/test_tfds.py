"""tensorflow-datasets builders: prepared once as ArrayRecord, read through tfds data sources
into the grain pipeline (no TensorFlow installed)."""

import json
import os

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from test_tasks import make_mvtec
from emit_jax.data.pipeline import PipelineConfig, make_dataset
from emit_jax.data.tfds_builders import EmitIAD, Mmad, TfdsRecords
from emit_jax.data.tokenizer import train_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_emit_iad_builder_from_a_local_mvtec_copy(tmp_path):
    src = make_mvtec(tmp_path / "mvtec")
    b = EmitIAD(config="stage1", data_dir=str(tmp_path / "tfds"), file_format="array_record")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=src))
    source = b.as_data_source()["train"]
    assert len(source) == 28  # AD for 20 images + DL for 8 anomalies
    assert any(f.endswith(".array_record-00000-of-00001") or ".array_record" in f
               for f in os.listdir(b.data_dir))
    records = TfdsRecords(source)
    rec = records[0]
    assert rec["messages"][1]["role"] == "assistant" and len(rec["image_bytes"]) == 2
    assert not os.path.isabs(rec["images"][0])
    tok = train_tiny_tokenizer(None, tmp_path / "tok")
    cfg = PipelineConfig(image_size=28, max_tiles=1, tokens_per_tile=4, length_buckets=(1024, 2048))
    batch = next(iter(make_dataset(records, tok, cfg, batch_size=4)))
    assert batch["input_ids"].shape[0] == 4 and batch["num_tiles"] == 8


def test_mmad_builder(tmp_path):
    b = Mmad(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.join(ROOT, "tests", "fixtures", "mmad")))
    source = b.as_data_source()["test"]
    n = sum(len(r["conversation"]) for r in
            json.load(open(os.path.join(ROOT, "tests", "fixtures", "mmad", "mmad.json"))).values())
    assert len(source) == n
    rec = TfdsRecords(source)[0]
    assert rec["solution"] in "ABCDE" and rec["messages"][0]["content"].count("<image>") == len(rec["image_bytes"])
