"""``python -m emit_jax.export --checkpoint CKPT --out DIR [--dtype ...] [--max-shard-size 5GB]``

Writes a Hugging Face folder (config.json + safetensors, sharded with an index past
``--max-shard-size``) from an emit_jax Orbax model checkpoint, plus the tokenizer / processor
files stored with the checkpoint. The folder loads with
``transformers.InternVLForConditionalGeneration.from_pretrained(DIR)``.
"""

from __future__ import annotations

import argparse
import sys
import time

from emit_jax import checkpoint, cli, hf
from emit_jax.fileio import check_free_space


def _shard_size(text: str) -> str:
    try:
        hf._parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m emit_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="emit_jax Orbax model checkpoint folder")
    p.add_argument("--out", required=True, help="new Hugging Face folder")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="cast parameters (default: keep the stored dtypes)")
    p.add_argument("--max-shard-size", default="5GB", type=_shard_size,
                   help="largest safetensors shard (default 5GB)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    model, meta = checkpoint.load_model(args.checkpoint, dtype=args.dtype)
    check_free_space(args.out, hf.state_bytes(model) + 2**20)
    hf.save(model, args.out, base_config=meta.get("hf_config"), max_shard_size=args.max_shard_size,
            assets_from=checkpoint.assets_dir(args.checkpoint))
    print(f"exported {args.checkpoint} -> {args.out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="emit_jax.export"))
