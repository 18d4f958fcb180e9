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
