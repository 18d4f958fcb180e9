"""MetricWriter (JSONL, TensorBoard, progress), read_metrics, plot_curves and plot_table."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import struct

import pytest

from emit_jax.training.metrics import MetricWriter, plot_curves, plot_table, read_metrics

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _tb_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files in ``tb_dir``: tensorboard's reader when
    installed, else the TFRecord framing parsed by hand (crc-checked) into tensorboardX Events."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        EventAccumulator = None
    if EventAccumulator is not None:
        acc = EventAccumulator(tb_dir)
        acc.Reload()
        return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}

    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")))
    assert files, f"no event file in {tb_dir}"
    for path in files:
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            assert hcrc == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + length]
            (bcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert bcrc == masked_crc32c(body)
            pos += 16 + length
            ev = Event.FromString(body)
            if ev.HasField("summary"):
                for v in ev.summary.value:
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def _steps(writer, steps, nan_at=None):
    for s in steps:
        writer.write(s, {"loss": 1.0 / s, "reward": 0.5 + 0.01 * s,
                         "acc/anomaly_discrimination": float("nan") if s == nan_at else s / 10},
                     tokens=100)


def test_writer_jsonl_progress_and_tensorboard(tmp_path):
    d = tmp_path / "grpo"
    stream = io.StringIO()
    with MetricWriter(str(d), stage="grpo", total_steps=6, stream=stream) as w:
        _steps(w, [1, 2, 3], nan_at=2)

    lines = (d / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    recs = [json.loads(ln) for ln in lines]
    # json.loads would accept a bare NaN; the file must hold strict JSON (null) instead.
    assert all("NaN" not in ln for ln in lines)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["stage"] == "grpo" and isinstance(r["time"], float) for r in recs)
    assert recs[0]["loss"] == 1.0 and recs[2]["reward"] == pytest.approx(0.53)
    assert recs[1]["acc/anomaly_discrimination"] is None
    assert recs[2]["acc/anomaly_discrimination"] == pytest.approx(0.3)

    out = stream.getvalue().splitlines()
    assert len(out) == 3
    assert out[0].startswith("[grpo] step 1/6 ")
    assert "loss 1 " in out[0] and "reward 0.51 " in out[0] and "tok/s" in out[0]
    assert "eta " in out[0]
    assert "acc/anomaly_discrimination nan" in out[1]
    assert "step 3/6" in out[2] and "loss 0.3333" in out[2]

    tb = _tb_scalars(str(d / "tb"))
    assert [s for s, _ in tb["grpo/loss"]] == [1, 2, 3]
    assert [v for _, v in tb["grpo/loss"]] == pytest.approx([1.0, 0.5, 1 / 3])
    acc = tb["grpo/acc/anomaly_discrimination"]
    assert acc[0] == (1, pytest.approx(0.1)) and math.isnan(acc[1][1])
    assert [s for s, _ in tb["grpo/tokens_per_s"]] == [1, 2, 3]
    assert all(v > 0 for _, v in tb["grpo/tokens_per_s"])


def test_writer_resume_appends(tmp_path):
    d = str(tmp_path / "sft")
    with MetricWriter(d, stage="sft", total_steps=6, tensorboard=False, progress=False,
                      stream=io.StringIO()) as w:
        _steps(w, [1, 2, 3])
    stream = io.StringIO()
    with MetricWriter(d, stage="sft", total_steps=6, start_step=3, tensorboard=False,
                      stream=stream) as w:
        _steps(w, [4, 5, 6])
    recs = read_metrics(os.path.join(d, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert not os.path.exists(os.path.join(d, "tb"))
    assert stream.getvalue().splitlines()[-1].startswith("[sft] step 6/6 ")
    assert stream.getvalue().splitlines()[-1].endswith("eta 0s")


def test_writer_tty_uses_tqdm(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    with MetricWriter(str(tmp_path), stage="sft", total_steps=4, tensorboard=False,
                      stream=stream) as w:
        _steps(w, [1, 2])
    text = stream.getvalue()
    assert "sft" in text and "2/4" in text and "loss=0.5" in text
    assert "[sft] step" not in text


def test_read_metrics_truncated_and_corrupt(tmp_path):
    p = tmp_path / "metrics.jsonl"
    good = [json.dumps({"stage": "sft", "step": i, "time": 0.0, "loss": 1.0}) for i in (1, 2)]
    p.write_text("\n".join(good) + '\n{"stage": "sft", "st')
    assert [r["step"] for r in read_metrics(p)] == [1, 2]

    p.write_text(good[0] + "\n{oops\n" + good[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(p)


def test_plot_curves(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    assert plot_curves(str(wd), str(tmp_path / "empty.png")) is None
    assert not (tmp_path / "empty.png").exists()

    with MetricWriter(str(wd / "base"), stage="base", total_steps=3, tensorboard=False,
                      progress=False) as w:
        for s in (1, 2, 3):
            w.write(s, {"loss": 2.0 / s})
    with MetricWriter(str(wd / "grpo"), stage="grpo", total_steps=3, tensorboard=False,
                      progress=False) as w:
        _steps(w, [1, 2, 3], nan_at=2)
        w.write(3, {"acc": 0.7, "reward": 0.6, "loss": 0.1})
    (wd / "notes").mkdir()  # a folder without metrics is ignored

    out = str(tmp_path / "plots" / "curves.png")
    assert plot_curves(str(wd), out) == out
    with open(out, "rb") as f:
        assert f.read(8) == PNG_SIG
    from PIL import Image
    with Image.open(out) as im:
        assert im.width > 0 and im.height > 0
    assert not [n for n in os.listdir(tmp_path / "plots") if n.startswith(".tmp")]


def test_plot_table(tmp_path):
    out = str(tmp_path / "table.png")
    rows = [["anomaly_discrimination", "0.812"], ["defect_type", "0.640"]]
    assert plot_table(rows, ["task", "accuracy"], out, title="held-out") == out
    with open(out, "rb") as f:
        assert f.read(8) == PNG_SIG


def test_metrics_bytes_that_are_not_utf8_are_a_corrupt_line(tmp_path, capsys):
    """Twenty-eighth probe C5: ``garbage\\x00\\xff`` appended to a finished stage's metrics.jsonl
    ended the rerun in a UnicodeDecodeError traceback after its evaluation, results.json
    unwritten. Now such a tail is a torn line (skipped), and a damaged line inside costs that
    stage's curves only, with a note."""
    good = [json.dumps({"stage": "base", "step": i, "time": 0.0, "loss": 1.0 / i}) for i in (1, 2)]
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(("\n".join(good) + "\n").encode() + b"garbage\x00\xff\n")
    assert [r["step"] for r in read_metrics(p)] == [1, 2]
    p.write_bytes(good[0].encode() + b"\n\xff\xfe\n" + good[1].encode() + b"\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: corrupt metrics line"):
        read_metrics(p)

    wd = tmp_path / "wd"
    for stage in ("base", "sft"):
        (wd / stage).mkdir(parents=True)
        (wd / stage / "metrics.jsonl").write_text("\n".join(good) + "\n")
    (wd / "sft" / "metrics.jsonl").write_bytes(p.read_bytes())
    assert plot_curves(str(wd), str(tmp_path / "c.png")) == str(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
    err = capsys.readouterr().err
    assert f"note: {wd}/sft/metrics.jsonl:2: corrupt metrics line" in err
    assert err.rstrip().endswith("the sft stage's curves are not drawn")
