"""The embedded default dataset: a small, deterministic, MVTec-AD-style anomaly-detection set.

The project's default training job needs data that exists without any download. This package
writes one, from a seed, in exactly the MVTec AD layout (docs/reference/mmad.md 10.1) so the same loaders,
task builders (docs/reference/emit.md 9.4, 9.5) and evaluators run on it as on the real datasets::

    OUT/<class>/train/good/NNN.png                 defect-free training images
    OUT/<class>/test/good/NNN.png                  defect-free test images
    OUT/<class>/test/<defect>/NNN.png              defective test images
    OUT/<class>/ground_truth/<defect>/NNN_mask.png single-channel 8-bit masks, 255 = defect
    OUT/domain_knowledge.json                      {"Embedded": {class: {defect: text, "good": ..}}}
    OUT/descriptions/<class>/<split>_<sub>_NNN.txt an object description per image (text-as-query
                                                   samples, docs/reference/emit.md 9.7); <split> is train/test,
                                                   <sub> is good or the defect folder
    OUT/splits.json                                {"train": [..], "validation": [..], "test": [..]}
    OUT/manifest.json, OUT/README.md, OUT/LICENSE_NOTES.md

Classes (all 256x256 RGB):

- ``pill``: the 17 real MVTec AD pill images shipped in ``emit_jax/data/embedded_assets/pill``
  (CC BY-NC-SA 4.0, credit MVTec Software GmbH), jittered per image (shift, rotation, exposure).
- ``screw``, ``nut``, ``capsule``, ``tile``, ``cable``, ``washer``: drawn procedurally with numpy
  signed-distance functions (anti-aliased), on a lightly textured background, with per-image
  shifts, rotations, scale, colour jitter and grain, so no two normal images are equal.

Defects (:data:`DEFECTS`) are painted onto the object with exact masks: ``scratch`` (thin curve),
``crack`` (jagged polyline), ``hole`` (dark ellipse), ``contamination`` (blob of a foreign colour
and grain), ``color_stain`` (translucent tint) and ``missing_piece`` (a chunk at the object's edge
replaced by background). The mask is the set of pixels the defect changed, no more and no less,
and it always lies inside the object's silhouette. Defect centres cycle through the nine cells of
the 3x3 grid of docs/reference/emit.md 9.5 (a seeded order per class and defect), so localisation answers vary.

Every image is drawn from its own random stream, seeded by ``(seed, class, split, folder,
index)``; the same seed gives byte-identical files, a different seed different images. The
splits are fixed: ``train`` = all of ``train/good`` plus half of every ``test/<folder>`` (the
model must see anomalies to learn); ``validation`` and ``test`` a quarter each, so every split
holds normal images and every defect type of every class.

API: :func:`generate` writes the dataset and returns its manifest; :func:`ensure_cached` builds
it once into a cache directory (atomically) and returns the path. CLI::

    python -m emit_jax.data.embedded --out DIR [--seed 0] [--overwrite]

Modules, lowest first (each imports only from those above it): ``catalogue`` (classes, defects,
counts, grid cells, palettes, the words for each class), ``seeding`` (seed checks and per-image
random streams), ``raster`` (small numpy / PIL image helpers, the 3x3 grid), ``assets`` (the
packaged pill images and texts), ``objects`` (the normal objects), ``defects`` (the defect
painters), ``sample`` (one image), ``text`` (domain knowledge, descriptions), ``notes`` (the
dataset's README.md and LICENSE_NOTES.md), ``writer`` (:func:`generate`), ``cache``
(:func:`ensure_cached`) and ``__main__`` (the command line).
"""

from emit_jax.data.embedded.cache import cache_path, ensure_cached
from emit_jax.data.embedded.catalogue import (
    CLASS_DEFECTS, CLASSES, DATASET_NAME, DEFECTS, GENERATOR_VERSION, GRID_CELLS, IMAGE_SIZE,
    LOCATION_PHRASE, MIN_DEFECT_PIXELS, N_PER_DEFECT, N_TEST_GOOD, N_TRAIN_GOOD,
)
from emit_jax.data.embedded.raster import grid_cells
from emit_jax.data.embedded.sample import render_sample
from emit_jax.data.embedded.text import domain_knowledge
from emit_jax.data.embedded.writer import generate

__all__ = [
    "CLASS_DEFECTS", "CLASSES", "DATASET_NAME", "DEFECTS", "GENERATOR_VERSION", "GRID_CELLS",
    "IMAGE_SIZE", "LOCATION_PHRASE", "MIN_DEFECT_PIXELS", "N_PER_DEFECT", "N_TEST_GOOD",
    "N_TRAIN_GOOD", "cache_path", "domain_knowledge", "ensure_cached", "generate", "grid_cells",
    "render_sample",
]
