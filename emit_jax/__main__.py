"""``python -m emit_jax``: not a command itself; it lists the commands (before: Python's "No
module named emit_jax.__main__")."""

from __future__ import annotations

import sys

COMMANDS = (
    ("emit_jax.train", "train the stages of a recipe (--config configs/grpo.py)"),
    ("emit_jax.evaluate", "answer an MMAD or MVTec-style folder's questions with a checkpoint"),
    ("emit_jax.data.build", "build the training records of an MVTec-style dataset"),
    ("emit_jax.data.embedded", "write the embedded default dataset to a folder"),
    ("emit_jax.convert", "a Hugging Face InternVL3 folder to an emit_jax checkpoint"),
    ("emit_jax.export", "an emit_jax checkpoint to a Hugging Face folder"),
    ("emit_jax.visualize", "draw the contrastive heat map of a query and a reference"),
    ("emit_jax.plan", "per-device memory plan of a recipe on a mesh"),
    ("emit_jax.aot", "compile a recipe's steps for a TPU slice on this host (libtpu)"),
    ("emit_jax.demo", "a short end-to-end run on the embedded default"),
    ("emit_jax.experiments.<name>", "the lab notes' experiments (docs/training.md)"),
    ("bench", "benchmarks (from the repository root: python -m bench --help)"),
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    lines = ["emit_jax's commands (each takes --help):"] + [
        f"  python -m {name:30s} {what}" for name, what in COMMANDS]
    if args and args[0] not in ("-h", "--help"):
        known = {name.removeprefix("emit_jax."): name for name, _ in COMMANDS}
        run = f"; run python -m {known[args[0]]}" if args[0] in known else ""
        print(f"python -m emit_jax: error: {args[0]!r}: python -m emit_jax takes no command{run} "
              "(python -m emit_jax --help lists the commands)", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
