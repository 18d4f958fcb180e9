"""``python -m emit_jax.convert --hf DIR --out CKPT [--dtype bfloat16|float32]``

Reads a transformers InternVL folder (config.json + safetensors, e.g. a local copy of
OpenGVLab/InternVL3-8B-hf) and writes an Orbax model checkpoint; tokenizer and processor files
that sit beside the weights are copied into ``CKPT/assets`` so ``emit_jax.export`` can put them
back.
"""

from __future__ import annotations

import argparse
import sys
import time

from emit_jax import checkpoint, cli, hf
from emit_jax.fileio import check_free_space
from emit_jax.models.config import read_hf_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m emit_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="new Orbax checkpoint folder")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="cast parameters (default: keep the stored dtypes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    _, raw = read_hf_config(args.hf)
    model = hf.load(args.hf, dtype=args.dtype)
    check_free_space(args.out, hf.state_bytes(model) + 2**20)
    checkpoint.save_model(model, args.out, hf_config=raw, assets_from=args.hf)
    from emit_jax.models.layers import count_params
    print(f"converted {args.hf} -> {args.out}: {count_params(model):,} parameters "
          f"in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="emit_jax.convert"))
