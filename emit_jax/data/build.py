"""``python -m emit_jax.data.build --source DIR --out train.jsonl --stage {1,2}``

Builds EMIT's training JSONL from an MVTec-AD-style dataset (:func:`emit_jax.data.records.build`).

Options: ``--domain-knowledge FILE`` (EMIT's dataset -> class -> {defect: text, good: text}
JSON; default ``DIR/domain_knowledge.json`` when present); ``--split`` (with a ``splits.json``,
which split to use; default ``train``); ``--embedding vit|pixels`` for the reference choice (vit
needs ``--checkpoint``; without one, pixels); ``--official-reference`` (the generator's rank-2
rule for anomalous queries); ``--text-samples``; ``--max-per-type N``; ``--policy error|skip``
(``skip``: an unreadable image or mask — a decompression bomb included — and a file name that is
not valid UTF-8 are skipped and counted in the summary's ``skipped``, each image decoded once
more first to find them; ``error``: the first one is one error line).

``--out`` names the one JSONL file written: an empty path, one ending with ``/`` or an existing
folder is refused before any work. One build at a time writes a given ``--out``: a second one
started meanwhile stops at once with one line naming the first one's pid (a lock file,
``.<name>.lock`` beside ``--out``, held while the build runs and removed after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from emit_jax import cli
from emit_jax.checkpoint import load_model
from emit_jax.data.records import build
from emit_jax.errors import ConfigError, show_path
from emit_jax.fileio import check_not_input, check_writable, output_lock


def _check_out(out: str) -> None:
    """Refuse, before any work, an ``--out`` that names no file: empty, ending with a path
    separator, or an existing folder (one JSONL file is written)."""
    if not out:
        raise ConfigError("--out: empty path; name the JSONL file to write")
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if out.endswith(seps) or os.path.isdir(out):
        example = os.path.join(out, "train.jsonl")
        raise ConfigError(f"--out {out}: names a folder; data.build writes one JSONL file "
                          f"(e.g. {example})")
    folder = os.path.dirname(os.path.realpath(out))
    for workdir in (folder, os.path.dirname(folder)):  # WD/x.jsonl, WD/data/base.jsonl
        if os.path.isfile(os.path.join(workdir, "data", "options.json")):  # a trainer's records
            raise ConfigError(f"--out {out}: inside the training workdir {workdir}, whose "
                              "records (data/) its stages train and resume on; write the "
                              "records outside it")  # (before: replaced, with one note)


def _check_records_file(out: str) -> None:
    """Refuse an existing ``--out`` that is not records this tool writes (its first line a JSON
    object with ``messages``), nor empty: before, any file given as ``--out`` (notes, a
    config, an image list) was replaced, with one note."""
    try:
        with open(out, "rb") as f:
            first = f.readline(1 << 20).strip()
    except OSError:
        return  # the write says what is wrong
    if not first:
        return
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not (isinstance(record, dict) and "messages" in record):
        raise ConfigError(f"--out {show_path(out)}: exists and is not a records file (its first "
                          "line is no record); data.build replaces only its own output: "
                          "choose another path, or move the file away")


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m emit_jax.data.build", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter, error_type=ConfigError)
    p.add_argument("--source", required=True, help="MVTec-AD-style dataset folder")
    p.add_argument("--out", required=True, help="JSONL file to write (not a folder)")
    p.add_argument("--stage", type=int, choices=[1, 2], required=True)
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    p.add_argument("--split", default=None, help="split from splits.json (train|validation|test|all)")
    p.add_argument("--domain-knowledge", default=None)
    p.add_argument("--embedding", choices=["auto", "vit", "pixels"], default="auto")
    p.add_argument("--checkpoint", default=None, help="emit_jax model checkpoint for --embedding vit")
    p.add_argument("--official-reference", action="store_true",
                   help="anomalous queries get the 2nd most similar normal image (official bug)")
    p.add_argument("--text-samples", action="store_true")
    p.add_argument("--max-per-type", type=cli.positive_int, default=None)
    p.add_argument("--policy", choices=["error", "skip"], default="error")
    p.add_argument("--adfm-frame", type=cli.int_in(14, cli.MAX_IMAGE_SIDE), default=None,
                   metavar="SIZE",
                   help="write AD-FM records (three-stage prompt, solution A/B, bbox_answer "
                        "boxes in a SIZE x SIZE model frame: the model's input size, e.g. 448; "
                        "at least one ViT patch, 14) instead of EMIT's")
    a = p.parse_args(argv)
    _check_out(a.out)
    check_not_input(a.out, {"--source": a.source, "--domain-knowledge": a.domain_knowledge,
                            "--checkpoint": a.checkpoint})
    check_writable(a.out)  # a device, pipe or link at --out, an unwritable folder: before work
    if a.adfm_frame:  # AD-FM records are one kind for both stages, without these
        ignored = [f for f, on in (("--text-samples", a.text_samples),
                                   ("--domain-knowledge", a.domain_knowledge)) if on]
        if ignored:  # before: accepted, and the records byte for byte the same without them
            raise ConfigError(f"{' and '.join(ignored)}: not used with --adfm-frame (AD-FM "
                              "records have no text samples and no domain knowledge)")
        if a.stage == 2:
            print("note: --stage 2 with --adfm-frame: AD-FM records are the same for both "
                  "stages", file=sys.stderr)
    if a.checkpoint and a.embedding == "pixels":  # before: loaded for nothing, or not at all
        raise ConfigError("--checkpoint: only read with --embedding vit or auto (it gives the ViT "
                          "that picks the references); --embedding pixels uses none")
    # one writer per --out: a second build of the same file stops here (both used to finish,
    # the later rename silently replacing the other's records)
    with output_lock(a.out, what=f"--out {show_path(a.out)}: another data.build is writing it",
                     hint="wait for it to end, or choose another --out"):
        if os.path.lexists(a.out):  # replaced only once the new records are complete
            _check_records_file(a.out)
            print(f"note: --out {show_path(a.out)} exists; it is replaced when the build "
                  "finishes", file=sys.stderr)
        vit_model = load_model(a.checkpoint)[0] if a.checkpoint else None
        summary = build(a.source, a.out, a.stage, seed=a.seed, split=a.split,
                        domain_knowledge=a.domain_knowledge, embedding=a.embedding,
                        vit_model=vit_model, official_reference=a.official_reference,
                        text_samples=a.text_samples, max_per_type=a.max_per_type,
                        policy=a.policy, adfm_frame=a.adfm_frame)
    cli.finished("emit_jax.data.build")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    cli.command(main, prog="emit_jax.data.build")
