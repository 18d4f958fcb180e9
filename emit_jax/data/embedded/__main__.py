"""``python -m emit_jax.data.embedded --out DIR [--seed 0] [--overwrite]``: write the dataset.

The dataset is built in a temporary folder beside ``DIR`` and renamed into place only when
complete, so an error, Ctrl-C or SIGTERM leaves ``DIR`` as it was (exit 2 with one ``error:``
line naming the path; exit 130 with one ``interrupted`` line) and a rerun starts afresh.
``--overwrite`` replaces only what the generator writes (its top-level files and, in its image,
mask and description folders, the files it names ``NNN.png``, ``NNN_mask.png``,
``<split>_<folder>_NNN.txt``); every other file or folder in ``DIR`` is kept (moved into the new
dataset before it replaces the old one).
"""

from __future__ import annotations

import os
import time

from emit_jax import cli
from emit_jax.data.embedded.writer import generate
from emit_jax.errors import DataError


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m emit_jax.data.embedded --out DIR [--seed 0] [--overwrite]``."""
    parser = cli.Parser(
        prog="python -m emit_jax.data.embedded",
        description="Write the embedded MVTec-AD-style anomaly-detection dataset. It is built "
                    "beside --out and renamed into place when complete: an error or an "
                    "interrupt leaves --out as it was.", error_type=DataError)
    parser.add_argument("--out", required=True, help="output directory (missing or empty)")
    parser.add_argument("--seed", type=cli.nonneg_int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out may be non-empty: replace only the files the generator "
                             "writes (its top-level files, and NNN.png / NNN_mask.png / "
                             "description .txt files in its own folders); keep every other file")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = generate(args.out, args.seed, overwrite=args.overwrite)
    except FileExistsError as e:
        if e.strerror is None and "(use overwrite)" in str(e):
            raise FileExistsError(str(e).replace("(use overwrite)", "(pass --overwrite)")) from None
        raise
    t = manifest["totals"]
    print(f"wrote {t['images']} images ({t['masks']} masks, {len(manifest['classes'])} classes; "
          f"train {t['train']}, validation {t['validation']}, test {t['test']}) to {args.out} "
          f"in {time.perf_counter() - t0:.1f}s, {_tree_bytes(args.out) / 1e6:.1f} MB "
          f"(seed {manifest['seed']}, generator v{manifest['version']})")
    return 0


if __name__ == "__main__":
    cli.command(main, prog="emit_jax.data.embedded")
