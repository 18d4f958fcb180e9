"""Regenerates the pictures in docs/design.md: ``python docs/make_figures.py``.

Paints a dark red scratch into a real MVTec AD pill image (../shared/data, CC BY-NC-SA 4.0,
MVTec Software GmbH), then draws reference | query | heat map with ``emit_jax.visualize``
(no checkpoint: the tiny architecture's randomly initialised ViT, seed 0).
"""

import os
import subprocess
import sys
import tempfile

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
PILLS = os.path.join(HERE, "..", "..", "shared", "data", "mvtec_pill_good")


def main():
    query = Image.open(os.path.join(PILLS, "003.png")).convert("RGB")
    ImageDraw.Draw(query).line([(300, 380), (420, 430)], fill=(120, 30, 20), width=14)
    with tempfile.TemporaryDirectory() as tmp:
        q = os.path.join(tmp, "pill_003_painted_scratch.png")
        query.save(q)
        cmd = [sys.executable, "-m", "emit_jax.visualize", "heatmap", "--query", q,
               "--reference", os.path.join(PILLS, "000.png"),
               "--out", os.path.join(HERE, "figures", "heatmap_pill_scratch.png")]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True, cwd=os.path.dirname(HERE))


if __name__ == "__main__":
    main()
