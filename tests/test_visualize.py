"""The heat-map picture: a defect painted into a real MVTec pill image is where the map peaks."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PILLS = os.path.join(ROOT, "..", "shared", "data", "mvtec_pill_good")


@pytest.mark.parametrize("query,reference,box,colour", [
    ("003.png", "000.png", (300, 380, 420, 430), (120, 30, 20)),   # dark red scratch, other pill
    ("011.png", "011.png", (470, 300, 540, 360), (40, 40, 40)),     # black stain, same pill
])
def test_heatmap_peaks_inside_a_painted_defect(query, reference, box, colour, tmp_path):
    if not os.path.isdir(PILLS):
        pytest.skip(f"{PILLS} (shared reference data) not present")
    img = Image.open(os.path.join(PILLS, query)).convert("RGB")
    draw = ImageDraw.Draw(img)
    if box[2] - box[0] > 100:
        draw.line([box[:2], box[2:]], fill=colour, width=14)
    else:
        draw.ellipse(box, fill=colour)
    q = tmp_path / "query.png"
    img.save(q)
    out = tmp_path / "heat.png"
    r = subprocess.run([sys.executable, "-m", "emit_jax.visualize", "heatmap", "--query", str(q),
                        "--reference", os.path.join(PILLS, reference), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    g = info["grid"]
    i, j = info["peak_cell"]
    cell = img.size[0] / g  # the 800 px image squashed to the g x g patch grid
    cx, cy = (j + 0.5) * cell, (i + 0.5) * cell
    x0, y0, x1, y1 = box
    assert x0 - cell <= cx <= x1 + cell and y0 - cell <= cy <= y1 + cell, (cx, cy, box)
    assert info["peak"] > 5 * max(info["median"], 0.01)
    with Image.open(out) as im:
        assert im.size[0] > 600 and im.mode in ("RGB", "RGBA")


def test_bad_image_is_one_line_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    r = subprocess.run([sys.executable, "-m", "emit_jax.visualize", "heatmap", "--query", str(bad),
                        "--reference", str(bad), "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.png" in lines[0] and "error" in lines[0]
    assert not os.path.exists(tmp_path / "x.png")


def test_arch_with_a_checkpoint_is_refused(tmp_path):
    """--arch only picks the random-init model; with --checkpoint it was silently ignored."""
    img = tmp_path / "q.png"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(img)
    r = subprocess.run([sys.executable, "-m", "emit_jax.visualize", "heatmap", "--query", str(img),
                        "--reference", str(img), "--checkpoint", str(tmp_path / "ckpt"),
                        "--arch", "tiny", "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--arch tiny: only without --checkpoint" in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "x.png")


def test_a_query_smaller_than_the_heat_map_is_said(tmp_path):
    q, ref = tmp_path / "q.png", tmp_path / "r.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(q)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(ref)
    r = subprocess.run([sys.executable, "-m", "emit_jax.visualize", "heatmap", "--query", str(q),
                        "--reference", str(ref), "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    notes = [l for l in r.stderr.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and f"--query {q} is 1x1 pixels" in notes[0], r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["query_size"] == [1, 1]


def test_names_that_are_not_utf8_are_drawn_and_said_as_bytes(tmp_path):
    """Thirtieth probe V-NU1: a --query named with a byte that is not UTF-8 ended in matplotlib's
    TypeError traceback (the figure's title, Python's lone surrogate); a missing one was said as
    ``q\\udcff.png``. The title and the messages show the name's bytes."""
    d = os.fsencode(str(tmp_path))
    q, ref = d + b"/q\xff.png", d + b"/r.png"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(os.fsdecode(ref))
    img = Image.new("RGB", (64, 64), (90, 90, 90))
    ImageDraw.Draw(img).ellipse((20, 20, 40, 40), fill=(200, 20, 20))
    img.save(os.fsdecode(q))
    for out in (d + b"/heat.png", d + b"/o\xfe.png"):
        r = subprocess.run([sys.executable, "-m", "emit_jax.visualize", "heatmap", "--query", q,
                            "--reference", ref, "--out", out], cwd=ROOT, capture_output=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
        assert b"Traceback" not in r.stderr, r.stderr
        with Image.open(os.fsdecode(out)) as im:
            assert im.size[0] > 100
    r = subprocess.run([sys.executable, "-m", "emit_jax.visualize", "heatmap", "--query",
                        d + b"/gone\xff.png", "--reference", ref, "--out", d + b"/x.png"],
                       cwd=ROOT, capture_output=True, timeout=600)
    assert r.returncode == 2
    [line] = r.stderr.decode().strip().splitlines()
    assert line == f"emit_jax.visualize: error: b'{tmp_path}/gone\\xff.png': no such file", line


def test_every_message_names_a_non_utf8_path_by_its_bytes(tmp_path):
    """Thirty-first probe VZ2 / VZ4: the output-is-the-input refusal and an unreadable image
    still showed a non-UTF-8 name as Python's ``\\udcff`` escape."""
    d = os.fsencode(str(tmp_path))
    q, bad = d + b"/q\xff.png", d + b"/bad\xff.png"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(os.fsdecode(q))
    with open(bad, "wb") as f:
        f.write(b"not an image")
    for query, out, want in (
            (q, q, f"b'{tmp_path}/q\\xff.png': the output is the input --query "
                   f"b'{tmp_path}/q\\xff.png'; choose a path outside it"),
            (bad, d + b"/o.png", f"b'{tmp_path}/bad\\xff.png': not a readable image (cannot "
                                 f"identify image file b'{tmp_path}/bad\\xff.png')")):
        r = subprocess.run([sys.executable, "-m", "emit_jax.visualize", "heatmap", "--query",
                            query, "--reference", q, "--out", out], cwd=ROOT,
                           capture_output=True, timeout=600)
        assert r.returncode == 2, r.stderr
        [line] = r.stderr.decode().strip().splitlines()
        assert line == f"emit_jax.visualize: error: {want}", line
        assert "udc" not in line
