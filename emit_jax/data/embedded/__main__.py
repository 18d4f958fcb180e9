"""``python -m emit_jax.data.embedded --out DIR [--seed 0] [--overwrite]``: write the dataset.

The dataset is built in a temporary folder beside ``DIR`` and renamed into place only when
complete, so an error, Ctrl-C or SIGTERM leaves ``DIR`` as it was (exit 2 with one ``error:``
line naming the path; exit 130 with one ``interrupted`` line) and a rerun starts afresh.
``--overwrite`` takes only a folder an earlier ``data.embedded`` wrote (its ``manifest.json``:
a user's own MVTec-style dataset has the same file names) and replaces only the files this
generation writes, by exact name (its top-level
files and, in its image, mask and description folders, the ``NNN.png``, ``NNN_mask.png`` and
``<split>_<folder>_NNN.txt`` files it numbers); every other file or folder in ``DIR`` is kept,
whatever its name (moved into the new dataset before it replaces the old one), and the size
reported counts only the generated files. Refused up front (one ``error:`` line, exit 2,
nothing written): an empty ``--out``, one that is not valid UTF-8 (training and evaluation
cannot read it), the current directory or a folder containing it, and with ``--overwrite`` a
folder that looks like a training workdir (``results.json``, ``<stage>/settings.json`` ...).
"""

from __future__ import annotations

import time

from emit_jax import cli
from emit_jax.data.embedded.writer import check_not_inside_a_dataset, dataset_bytes, generate
from emit_jax.errors import DataError
from emit_jax.fileio import check_utf8_path


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m emit_jax.data.embedded --out DIR [--seed 0] [--overwrite]``."""
    parser = cli.Parser(
        prog="python -m emit_jax.data.embedded",
        description="Write the embedded MVTec-AD-style anomaly-detection dataset. It is built "
                    "beside --out and renamed into place when complete: an error or an "
                    "interrupt leaves --out as it was.", error_type=DataError)
    parser.add_argument("--out", required=True,
                        help="output directory (missing or empty; not the current directory or "
                             "one containing it)")
    parser.add_argument("--seed", type=cli.nonneg_int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out may be an earlier data.embedded output (its manifest.json; "
                             "not your own dataset, a workdir or a model folder): replace only "
                             "the files this generation writes, by exact name (its top-level "
                             "files, and the NNN.png / NNN_mask.png / description .txt files it "
                             "numbers in its own folders); keep every other file, whatever its "
                             "name")
    args = parser.parse_args(argv)
    if not args.out:
        raise DataError("--out: empty path; name the folder to write")
    check_utf8_path(args.out, "--out", why="the training and evaluation commands cannot read it "
                    "(tokenizers and Orbax cannot use such names)")
    t0 = time.perf_counter()
    try:
        check_not_inside_a_dataset(args.out)
        manifest = generate(args.out, args.seed, overwrite=args.overwrite)
    except FileExistsError as e:
        if e.strerror is None and "(use overwrite)" in str(e):
            raise FileExistsError(str(e).replace("(use overwrite)", "(pass --overwrite)")) from None
        raise
    t = manifest["totals"]
    cli.finished("emit_jax.data.embedded")
    print(f"wrote {t['images']} images ({t['masks']} masks, {len(manifest['classes'])} classes; "
          f"train {t['train']}, validation {t['validation']}, test {t['test']}) to {args.out} "
          f"in {time.perf_counter() - t0:.1f}s, {dataset_bytes(args.out) / 1e6:.1f} MB "
          f"(seed {manifest['seed']}, generator v{manifest['version']})")
    return 0


if __name__ == "__main__":
    cli.command(main, prog="emit_jax.data.embedded")
