"""``python -m emit_jax.demo [--arch tiny] [--workdir DIR]``: a quick check of the model
path, with no training (the main job is ``python -m emit_jax.train``; see the README).

End to end on the CPU, with no downloads: build the named architecture with random weights, run
an image + text prompt through it (greedy decoding with the KV cache, checked against the full
forward), write it as a Hugging Face folder, convert that to an Orbax checkpoint, export it back,
and check that every tensor survived bit for bit.

The folders it writes hold the random weights and config only, no tokenizer (the model was made
without one): they are not for ``python -m emit_jax.evaluate``, which refuses them in one line.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emit_jax import checkpoint, cli, hf
from emit_jax.errors import ConfigError
from emit_jax.fileio import check_no_control, check_utf8_path
from emit_jax.models import architectures
from emit_jax.models.internvl import InternVL
from emit_jax.models.layers import count_params
from emit_jax.ops.sampling import generate


#: what the demo writes into its --workdir (each run its own time-stamped folders)
DEMO_ENTRY = re.compile(r"^(hf|ckpt|hf-export)-\d{8}-\d{6}$")


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m emit_jax.demo", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter, error_type=ConfigError)
    p.add_argument("--arch", default="tiny", choices=sorted(architectures.ARCHITECTURES))
    p.add_argument("--workdir", default=None, type=cli.nonempty,
                   help="where the HF folder and checkpoint go (default: a temporary folder)")
    p.add_argument("--new-tokens", type=cli.int_in(1, cli.MAX_TOKENS), default=16,
                   help="how many tokens to generate greedily (default: 16)")
    args = p.parse_args(argv)
    if args.workdir is not None:  # refused before any work
        # (twenty-sixth probe DM5: a newline in the path was refused after the work, the
        # folder made and left)
        check_no_control(args.workdir)
        # Orbax (TensorStore) cannot write a checkpoint under a path that is not UTF-8
        check_utf8_path(args.workdir, "--workdir", why="Orbax cannot write a checkpoint there")
        if os.path.lexists(args.workdir) and not os.path.isdir(args.workdir):
            raise ConfigError(f"--workdir {args.workdir}: exists and is not a folder; choose a "
                              "folder (it is created if missing)")
        if os.path.isdir(args.workdir):  # before: demo folders written into a dataset or checkpoint
            other = sorted(n for n in os.listdir(args.workdir) if not DEMO_ENTRY.match(n))
            if other:
                raise ConfigError(f"--workdir {args.workdir}: holds {other[0]!r}, which the demo "
                                  "did not write; give an empty folder or an earlier demo's")

    cfg = architectures.get_config(args.arch)
    context = cfg.text.max_position_embeddings
    if args.new_tokens + cfg.tokens_per_tile + 12 > context:  # before: decoded until killed
        raise ConfigError(f"--new-tokens {args.new_tokens}: with the demo's prompt "
                          f"({cfg.tokens_per_tile + 12} tokens) that passes {args.arch}'s "
                          f"context of {context:,} positions")
    t0 = time.time()
    model = InternVL(cfg, rngs=nnx.Rngs(0))
    print(f"[1/4] built {args.arch}: {count_params(model):,} parameters "
          f"({time.time() - t0:.1f}s, {jax.devices()[0].platform})")

    # One image (one tile) and a short prompt around its visual tokens.
    n_vis = cfg.tokens_per_tile
    rs = np.random.RandomState(0)
    pixels = jnp.asarray(rs.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size), jnp.float32)
    ids = np.concatenate([rs.randint(0, 1000, 4), np.full(n_vis, cfg.image_token_id),
                          rs.randint(0, 1000, 8)])[None]
    t0 = time.time()
    out = generate(model, ids, pixel_values=pixels, max_new_tokens=args.new_tokens)
    out.tokens.block_until_ready()
    full = model(jnp.concatenate([jnp.asarray(ids), out.tokens], 1), pixels)
    greedy = jnp.argmax(full[:, ids.shape[1] - 1:-1], -1)
    agree = bool(jnp.all(greedy == out.tokens))
    print(f"[2/4] generated {args.new_tokens} tokens with the KV cache in {time.time() - t0:.1f}s "
          f"(incl. compile); equal to the full forward's greedy tokens: {agree}")

    if args.workdir is None:  # removed at the end (before: 231 MB left in /tmp by every run)
        with tempfile.TemporaryDirectory(prefix="emit_jax_demo_") as work:
            same = _round_trip(model, work, kept=False)
    else:
        os.makedirs(args.workdir, exist_ok=True)
        same = _round_trip(model, args.workdir, kept=True)
    return 0 if (agree and same) else 1


def _round_trip(model, work: str, kept: bool) -> bool:
    """Steps 3 and 4: ``model`` to an HF folder, an Orbax checkpoint and back, in ``work``;
    whether every tensor came back bit for bit."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    hf_dir = os.path.join(work, f"hf-{stamp}")
    ckpt = os.path.join(work, f"ckpt-{stamp}")
    back = os.path.join(work, f"hf-export-{stamp}")
    t0 = time.time()
    hf.save(model, hf_dir, max_shard_size="20MB")
    loaded = hf.load(hf_dir)
    checkpoint.save_model(loaded, ckpt, hf_config=None, assets_from=hf_dir)
    restored, _ = checkpoint.load_model(ckpt)
    hf.save(restored, back, max_shard_size="20MB")
    where = back if kept else "in a temporary folder, removed at the end (--workdir DIR keeps them)"
    print(f"[3/4] HF folder -> Orbax checkpoint -> HF folder in {time.time() - t0:.1f}s: {where}")

    a = nnx.to_flat_state(nnx.state(model, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(hf.load(back), nnx.Param)))
    same = all(np.asarray(v.get_value()).tobytes() == np.asarray(b[k].get_value()).tobytes()
               for k, v in a)
    print(f"[4/4] every tensor bit-identical after the round trip: {same}")
    return same


if __name__ == "__main__":
    cli.command(main, prog="emit_jax.demo")
