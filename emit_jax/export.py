"""``python -m emit_jax.export --checkpoint CKPT --out DIR [--format transformers|internvl_chat]
[--dtype ...] [--max-shard-size 5GB]``

Writes a model folder (config.json + safetensors, sharded with an index past
``--max-shard-size``) from an emit_jax Orbax model checkpoint, plus the tokenizer / processor
files stored with the checkpoint (its ``assets/``; a checkpoint without tokenizer files exports
with one ``warning:`` line saying the folder has none).

- ``--format transformers`` (default): loads with
  ``transformers.InternVLForConditionalGeneration.from_pretrained(DIR)``; an EMIT model's soft
  prompt and projector go to ``emit_extras.safetensors`` beside it.
- ``--format internvl_chat``: the original InternVL layout the EMIT authors' evaluation loads
  with their ``CustomizedInternVLChatModel`` (and OpenGVLab's ``InternVLChatModel`` for a plain
  InternVL), with no missing and no unexpected keys: fused ViT ``attn.qkv``, an untied
  ``lm_head``, ``soft_prompt.weight`` / ``projector.0.*`` (BatchNorm, ``num_batches_tracked``
  included) / ``projector.1.*`` inline, an ``InternVLChatConfig`` config.json (template
  ``internvl2_5``, ``ps_version`` v2) and the tokenizer with ``<COMP_CONTEXT>``, including the slow
  tokenizer's ``vocab.json`` / ``merges.txt`` (they load it with ``use_fast=False``). Their model
  class is custom code: put their ``model/internvl_chat`` package on the path as their scripts
  do. An EMIT model their code cannot represent (other CE layers or soft-token count,
  ``max_readout``, an ablation) is refused; a window other than their default 6 is written with
  a warning naming the ``NEIGHBOR_DIS`` value to run their code with.
"""

from __future__ import annotations

import argparse
import sys
import time

from emit_jax import checkpoint, cli, hf
from emit_jax.data.tokenizer import has_tokenizer_files
from emit_jax.errors import ConfigError, show_path
from emit_jax.fileio import (check_free_space, check_new_folder, check_not_input, output_lock,
                             remove_leftovers)

FORMATS = ("transformers", "internvl_chat")
PROG = "emit_jax.export"
def _shard_size(text: str) -> str:
    try:
        size = hf._parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return text


def parse_args(argv=None):
    p = cli.Parser(prog="python -m emit_jax.export", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter, error_type=ConfigError)
    p.add_argument("--checkpoint", required=True, help="emit_jax Orbax model checkpoint folder")
    p.add_argument("--out", required=True, type=cli.output_folder, help="new model folder")
    p.add_argument("--format", choices=FORMATS, default="transformers",
                   help="folder layout (default transformers; internvl_chat: the EMIT authors' "
                        "and OpenGVLab's original format)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="cast parameters (default: keep the stored dtypes)")
    p.add_argument("--max-shard-size", default="5GB", type=_shard_size,
                   help="largest safetensors shard (default 5GB)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_not_input(args.out, {"--checkpoint": args.checkpoint})
    t0 = time.time()
    meta = checkpoint.read_meta(args.checkpoint)
    check_new_folder(args.out, hint="choose a new folder")  # (named before the lock)
    with output_lock(args.out, what=f"--out {show_path(args.out)}: another export is writing "
                     "it", hint="wait for it to end, or choose another --out"):
        remove_leftovers(args.out, args.out)  # a killed run's .tmp-<name>-* (see convert)
        check_new_folder(args.out, hint="choose a new folder")  # before the model is loaded
        assets = checkpoint.assets_dir(args.checkpoint)

        def warn(text: str) -> None:
            print(f"{PROG}: {text}", file=sys.stderr)

        if args.format == "internvl_chat":
            from emit_jax import internvl_chat

            meta_chat = meta.get("internvl_chat") or {}
            model, _ = checkpoint.load_model(args.checkpoint, dtype=args.dtype)
            internvl_chat.check_exportable(model)  # before the disk is touched
            check_free_space(args.out, hf.state_bytes(model) + 2**20)
            internvl_chat.save(model, args.out, base_config=meta_chat.get("config"),
                               max_shard_size=args.max_shard_size, tokenizer_from=assets,
                               num_batches_tracked=meta_chat.get("num_batches_tracked") or 0,
                               log=warn)
        else:
            model, meta = checkpoint.load_model(args.checkpoint, dtype=args.dtype)
            check_free_space(args.out, hf.state_bytes(model) + 2**20)
            if not has_tokenizer_files(assets):
                warn(f"warning: {assets}: no tokenizer stored with the checkpoint; the exported "
                     "folder has no tokenizer files (copy them from the model it was made from)")
            hf.save(model, args.out, base_config=meta.get("hf_config"),
                    max_shard_size=args.max_shard_size, assets_from=assets)
        cli.finished(PROG)
        print(f"exported {args.checkpoint} -> {args.out} ({args.format}) in "
              f"{time.time() - t0:.1f}s")
        return 0


if __name__ == "__main__":
    cli.command(main, prog=PROG)
