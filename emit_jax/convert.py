"""``python -m emit_jax.convert --hf DIR --out CKPT [--dtype bfloat16|float32]``

Reads a model folder and writes an Orbax model checkpoint; tokenizer and processor files that
sit beside the weights are copied into ``CKPT/assets`` so ``emit_jax.export`` can put them back.
Two folder formats are read (single or sharded safetensors, stored dtypes kept):

- transformers' InternVL (``model_type: internvl``, e.g. a local ``OpenGVLab/InternVL3-8B-hf``),
  with an ``emit_extras.safetensors`` beside it for an EMIT model written by ``emit_jax.export``;
- the original ``internvl_chat`` format (``OpenGVLab/InternVL3-8B``, and the EMIT authors'
  released ``gw49/EMIT-8B``). A folder holding EMIT's ``soft_prompt.weight`` and
  ``projector.*`` becomes an EMIT model with the authors' constants: CE layers 4, 8, 16, 20,
  4 reference rotations, the ``<COMP_CONTEXT>`` id from the folder's tokenizer, the window of
  their ``NEIGHBOR_DIS`` (default 6; ``--window``), their BatchNorm quirk for further training
  (``--bn-mode official``). Without those tensors it is a plain InternVL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from emit_jax import checkpoint, cli, hf
from emit_jax.errors import ConfigError, show_path
from emit_jax.fileio import (check_free_space, check_new_folder, check_not_input, check_utf8_path,
                             output_lock, read_json, remove_leftovers)


def _layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers, got "
                                         f"{text!r}") from None
    if not layers or any(x < 1 for x in layers):
        raise argparse.ArgumentTypeError(f"block numbers start at 1, got {text!r}")
    return layers


def _window(text: str) -> int:
    try:
        w = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of patches, got {text!r}") from None
    if w < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {w}")
    if w > cli.INT_MAX:
        raise argparse.ArgumentTypeError(f"must be <= {cli.INT_MAX}, got {w}")
    return w


def _non_finite(model) -> tuple[list[str], int] | None:
    """``([names of the float arrays holding NaN or inf], number of float arrays)``, or None
    when every value is finite."""
    import jax.numpy as jnp
    from flax import nnx

    names, total = [], 0
    for path, value in nnx.to_flat_state(nnx.state(model)):
        x = value.get_value() if hasattr(value, "get_value") else value
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            total += 1
            if not bool(jnp.isfinite(x).all()):
                names.append(".".join(map(str, path)))
    return (names, total) if names else None


def parse_args(argv=None):
    p = cli.Parser(prog="python -m emit_jax.convert", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter, error_type=ConfigError)
    p.add_argument("--hf", required=True,
                   help="model folder: transformers InternVL or internvl_chat (config.json + "
                        "safetensors)")
    p.add_argument("--out", required=True, type=cli.output_folder,
                   help="new Orbax checkpoint folder")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="cast parameters (default: keep the stored dtypes)")
    g = p.add_argument_group("EMIT in an internvl_chat folder (the authors' constants by default)")
    g.add_argument("--window", type=_window, default=None,
                   help="heat-map window half-width in patches, their NEIGHBOR_DIS (default 6)")
    g.add_argument("--ce-layers", type=_layers, default=None,
                   help="ViT blocks of the heat map, e.g. 4,8,16,20 (default, hard-coded in "
                        "their model)")
    g.add_argument("--bn-mode", choices=["official", "standard"], default=None,
                   help="BatchNorm statistics in further training: 'official' replays their "
                        "dummy CE pass (default), 'standard' does not")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Orbax (TensorStore) cannot write a path that is not UTF-8: refused before any work
    check_utf8_path(args.out, "--out", why="Orbax cannot write a checkpoint there")
    check_not_input(args.out, {"--hf": args.hf})
    if os.path.exists(args.hf) and not os.path.isdir(args.hf):
        raise ConfigError(f"{args.hf}: a file, not a folder; --hf takes the model folder "
                          "(config.json + safetensors)")
    if not os.path.exists(os.path.join(args.hf, "config.json")):  # (before: "not found")
        if os.path.isfile(os.path.join(args.hf, checkpoint.META_FILE)):
            raise ConfigError(f"{args.hf}: already an emit_jax model checkpoint, which evaluate, "
                              "visualize and --config.init_from read as it is; for a Hugging "
                              f"Face folder, python -m emit_jax.export --checkpoint {args.hf} "
                              "--out DIR")
        hint = checkpoint.model_hint(args.hf) if os.path.isdir(args.hf) else ""
        if hint:  # a training checkpoint, a stage folder, a workdir: where the models are
            raise ConfigError(f"{args.hf}: not a Hugging Face model folder{hint} (an emit_jax "
                              "checkpoint: no conversion needed)")
    t0 = time.time()
    chat = hf.is_internvl_chat(args.hf)
    # the input's config first (a missing folder or config.json is named as such), then the
    # flags that depend on its format, then the output path
    _, raw = hf.read_config(args.hf)
    if not chat and (args.window is not None or args.ce_layers is not None
                     or args.bn_mode is not None):  # before: --bn-mode silently ignored
        raise ConfigError(f"{args.hf}: --window / --ce-layers / --bn-mode apply to "
                          "internvl_chat folders only (a transformers folder's EMIT settings "
                          "are in its "
                          "emit_extras.safetensors)")
    flags = [f for f, v in (("--window", args.window), ("--ce-layers", args.ce_layers),
                            ("--bn-mode", args.bn_mode)) if v is not None]
    if chat and flags:  # (twenty-second probe X52/X55: ignored on a plain InternVL, no word)
        from emit_jax.internvl_chat import ChatReader

        reader = ChatReader(args.hf)
        try:
            has_emit = bool(reader.emit)
        finally:
            reader.close()
        if not has_emit:
            raise ConfigError(f"{args.hf}: {' / '.join(flags)} set EMIT's heat map, and this "
                              "internvl_chat folder holds no EMIT tensors (soft_prompt, "
                              "projector): a plain InternVL; leave the flags out")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # copied into the checkpoint as is
        path = os.path.join(args.hf, name)
        if os.path.lexists(path):  # a folder or a pipe there was left out without a word
            try:  # before: copied; evaluate failed on it
                read_json(path, error=ConfigError, what="a readable tokenizer file")
            except ConfigError as e:
                raise ConfigError(f"{e}; the checkpoint would carry a tokenizer no command can "
                                  "load") from None
    check_new_folder(args.out, hint="choose a new checkpoint path")  # (named before the lock)
    # one writer per --out; under its lock a .tmp-<name>-* beside it is a killed run's (before:
    # kept for ever, GBs for a real model, without a word)
    with output_lock(args.out, what=f"--out {show_path(args.out)}: another convert is writing "
                     "it", hint="wait for it to end, or choose another --out"):
        remove_leftovers(args.out, args.out)
        # before the model is loaded
        check_new_folder(args.out, hint="choose a new checkpoint path")
        extra = {}
        if chat:
            from emit_jax import internvl_chat

            model, info = internvl_chat.load(args.hf, dtype=args.dtype, window=args.window,
                                             ce_layers=args.ce_layers,
                                             bn_mode=args.bn_mode or "official")
            raw = model.config.to_hf_dict()  # an EMIT model's config is its base model's
            extra["internvl_chat"] = info
        else:
            model = hf.load(args.hf, dtype=args.dtype)
        if bad := _non_finite(model):  # a damaged file: before, converted without a word
            print(f"emit_jax.convert: warning: {args.hf}: {len(bad[0])} of {bad[1]} weight arrays "
                  f"hold NaN or infinite values (first: {bad[0][0]}); converted as they are, but "
                  "such a model answers nothing useful", file=sys.stderr)
        check_free_space(args.out, hf.state_bytes(model) + 2**20)
        checkpoint.save_model(model, args.out, hf_config=raw, assets_from=args.hf, extra_meta=extra)
        from emit_jax.models.layers import count_params
        cli.finished("emit_jax.convert")
        kind = "EMIT" if hasattr(model, "emit_config") else "InternVL"
        src = "internvl_chat" if chat else "transformers"
        print(f"converted {args.hf} ({src}) -> {args.out}: {kind}, {count_params(model):,} "
              f"parameters in {time.time() - t0:.1f}s")
        if kind == "EMIT" and chat:
            e = model.emit_config
            print(f"EMIT: CE layers {list(e.ce_layers)}, window {e.window}, "
                  f"{e.num_soft_tokens} soft tokens, <COMP_CONTEXT> id {e.comp_token_id}, "
                  f"bn_mode {e.bn_mode}")
        return 0


if __name__ == "__main__":
    cli.command(main, prog="emit_jax.convert")
