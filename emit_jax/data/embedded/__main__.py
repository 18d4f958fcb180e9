"""``python -m emit_jax.data.embedded --out DIR [--seed 0] [--overwrite]``: write the dataset."""

from __future__ import annotations

import argparse
import os
import sys
import time

from emit_jax.data.embedded.writer import generate


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m emit_jax.data.embedded --out DIR [--seed 0] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m emit_jax.data.embedded",
        description="Write the embedded MVTec-AD-style anomaly-detection dataset.")
    parser.add_argument("--out", required=True, help="output directory (missing or empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the generator's files in a non-empty --out")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    t0 = time.perf_counter()
    try:
        manifest = generate(args.out, args.seed, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError) as e:
        msg = str(e).replace("(use overwrite)", "(pass --overwrite)")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t = manifest["totals"]
    print(f"wrote {t['images']} images ({t['masks']} masks, {len(manifest['classes'])} classes; "
          f"train {t['train']}, validation {t['validation']}, test {t['test']}) to {args.out} "
          f"in {time.perf_counter() - t0:.1f}s, {_tree_bytes(args.out) / 1e6:.1f} MB "
          f"(seed {manifest['seed']}, generator v{manifest['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
