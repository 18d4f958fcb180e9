"""``python -m emit_jax.visualize heatmap --query Q.png --reference R.png [--checkpoint CKPT] --out heat.png``

Draws the normal reference, the query, and the query with EMIT's anomaly heat map overlaid, side
by side. The features come from the checkpoint's own ViT (an emit_jax Orbax model checkpoint,
InternVL or EMIT; its EMIT settings are used when present), or, with no checkpoint, from a
randomly initialised ViT of ``--arch`` (seed 0): untrained features still separate a painted
defect from its surroundings, but only a trained model gives meaningful maps for real defects.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

from emit_jax import cli
from emit_jax.data.image import load_image, to_display, to_tile
from emit_jax.errors import ConfigError, show_path
from emit_jax.fileio import (atomic_path, check_not_input, check_writable, matplotlib_agg,
                             output_lock)
from emit_jax.models.emit import EMITConfig, contrastive_heatmap


def _check_layers(layers, depth: int) -> None:
    if layers and not all(1 <= l <= depth for l in layers):
        raise ConfigError(f"--layers {' '.join(map(str, layers))}: the ViT has blocks 1..{depth}")
    if layers and len(set(layers)) != len(layers):  # before: a block counted twice
        raise ConfigError(f"--layers {' '.join(map(str, layers))}: a block is named twice")


def compute_heatmap(query_path, reference_path, *, checkpoint=None, arch="tiny", window=None,
                    layers=None):
    """-> (heat ``[g, g]``, query tile, reference tile, settings dict)."""
    from flax import nnx

    images = load_image(query_path), load_image(reference_path)  # bad images before the model
    if checkpoint:
        from emit_jax.checkpoint import load_model

        model, _ = load_model(checkpoint)
        ecfg = getattr(model, "emit_config", EMITConfig())
        mllm = getattr(model, "mllm", model)
        vcfg, vision = mllm.config.vision, mllm.vision_tower
    else:
        from emit_jax.models import architectures
        from emit_jax.models.internvit import InternViT

        mcfg = architectures.get_config(arch)
        _check_layers(layers, mcfg.vision.num_hidden_layers)  # before the weights are made
        # the ViT alone, as InternVL(mcfg, rngs=Rngs(0)) draws it first (the same weights): the
        # whole model of --arch internvl3_8b was built before and did not fit a 24 GB host
        ecfg, vcfg = EMITConfig(), mcfg.vision
        vision = InternViT(vcfg, dtype=mcfg.dtype, param_dtype=mcfg.param_dtype,
                           rngs=nnx.Rngs(0), scan_layers=mcfg.scan_layers)
    size = vcfg.image_size
    q, r = (to_tile(im, size) for im in images)
    _check_layers(layers, vcfg.num_hidden_layers)
    layers = tuple(layers) if layers else ecfg.layers_for(vcfg.num_hidden_layers)
    window = ecfg.window_for(vcfg.grid) if window is None else window
    ce = jnp.asarray(np.stack([r, q])[None])
    heat = np.asarray(contrastive_heatmap(vision, ce, layers, window,
                                          rotations=ecfg.rotations, zero_fill=ecfg.zero_fill,
                                          turns=ecfg.reference_turns,
                                          feature_turns=ecfg.feature_turns,
                                          align_turn=ecfg.align_turn))[0]
    return heat, q, r, {"layers": list(layers), "window": window, "grid": vcfg.grid,
                        "image_size": size, "query_size": list(images[0].size),
                        "reference_size": list(images[1].size)}


def render(heat, query_tile, reference_tile, out, title=""):
    matplotlib_agg()
    import matplotlib.pyplot as plt

    size = query_tile.shape[-1]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    axes[0].imshow(to_display(reference_tile))
    axes[0].set_title("reference (normal)")
    axes[1].imshow(to_display(query_tile))
    axes[1].set_title("query")
    axes[2].imshow(to_display(query_tile))
    im = axes[2].imshow(heat, cmap="jet", alpha=0.5, extent=(0, size, size, 0),
                        interpolation="bilinear")
    axes[2].set_title("heat map (1 - windowed max cosine)")
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    for a in axes:
        a.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.94) if title else None)
    fmt = image_format(out)
    key = _MARK_KEYS.get(fmt)  # the figure carries the command's name: what it may replace
    try:
        with atomic_path(out) as tmp:  # a failed or interrupted write leaves no half image
            fig.savefig(tmp, dpi=100, format=fmt, **({"metadata": {key: MARK}} if key else {}))
    finally:
        plt.close(fig)


#: the name a figure of this command carries (PNG Software, PDF / SVG / PS Creator): an
#: existing ``--out`` is replaced only when it is such a figure
MARK = "emit_jax.visualize"
_MARK_KEYS = {"png": "Software", "pdf": "Creator", "svg": "Creator", "ps": "Creator",
              "eps": "Creator"}


def is_our_figure(path: str) -> bool:
    """Whether the file at ``path`` is a figure this command wrote (its metadata names it)."""
    try:
        with open(path, "rb") as f:
            return MARK.encode() in f.read(64 * 2**20)
    except OSError:
        return False


def image_format(out: str) -> str:
    """The image format matplotlib writes for ``out``'s extension (``png``, ``pdf``, ``svg``,
    ...); a missing or unknown one raises :class:`ConfigError` naming ``--out``."""
    matplotlib_agg()
    from matplotlib.backend_bases import FigureCanvasBase

    known = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(os.fspath(out))[1][1:].lower()
    if ext not in known:
        what = f"unknown image file extension {'.' + ext!r}" if ext else "no image file extension"
        raise ConfigError(f"--out {show_path(out)}: {what}; use one of "
                          f"{', '.join('.' + k for k in sorted(known))} (e.g. heat.png)")
    return ext


def _figure(args) -> tuple[np.ndarray, dict]:
    """The heat map of ``args.query`` against ``args.reference``, drawn to ``args.out`` (the
    notes its inputs call for printed first): ``(heat [h, w], info)``."""
    heat, q, r, info = compute_heatmap(args.query, args.reference, checkpoint=args.checkpoint,
                                       arch=args.arch or "tiny", window=args.window,
                                       layers=args.layers)
    if os.path.realpath(args.query) == os.path.realpath(args.reference):  # said once both read
        print(f"warning: --query and --reference are the same image ({args.query}): the heat map "
              "compares it with itself and is zero everywhere", file=sys.stderr)
    if info["window"] >= info["grid"]:  # every window covers the whole grid
        print(f"note: --window {info['window']} reaches past the {info['grid']}x{info['grid']} "
              f"heat-map grid: each patch is compared with every reference patch (the same map "
              f"as --window {info['grid'] - 1})", file=sys.stderr)
    for flag in ("query", "reference"):  # a heat-map cell would be less than one of its pixels
        w, hgt = info[f"{flag}_size"]
        if min(w, hgt) < info["grid"]:
            side = "" if w == hgt else f" (its {'width' if w < hgt else 'height'})"
            print(f"note: --{flag} {getattr(args, flag)} is {w}x{hgt} pixels, {min(w, hgt)}"
                  f"{side} fewer than the heat map's {info['grid']} cells a side; it is "
                  f"resized to {info['image_size']}x{info['image_size']} and its map says little",
                  file=sys.stderr)
    # (a name that is not UTF-8 as its bytes: thirtieth probe V-NU1, matplotlib's font could not
    # encode Python's lone surrogates, a traceback)
    render(heat, q, r, args.out, title=show_path(os.path.basename(args.query)))
    return heat, info


def main(argv=None) -> int:
    from emit_jax.models.architectures import ARCHITECTURES

    p = cli.Parser(prog="python -m emit_jax.visualize", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter, error_type=ConfigError)
    sub = p.add_subparsers(dest="what", required=True, metavar="{heatmap}")
    h = sub.add_parser("heatmap", help="reference | query | heat-map overlay")
    h.add_argument("--query", required=True)
    h.add_argument("--reference", required=True)
    h.add_argument("--checkpoint", default=None, help="emit_jax Orbax model checkpoint")
    h.add_argument("--arch", default=None, choices=sorted(ARCHITECTURES),
                   help="random-init architecture without a checkpoint (default: tiny)")
    h.add_argument("--window", type=cli.nonneg_int, default=None,
                   help="heat-map window half-width in patches (default: the model's)")
    h.add_argument("--layers", type=cli.positive_int, nargs="+", default=None,
                   help="ViT blocks of the heat map, 1-based (default: the model's)")
    h.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    if args.checkpoint and args.arch:  # it would be ignored: the checkpoint has its own
        p.error(f"--arch {args.arch}: only without --checkpoint (the checkpoint's model is used)")
    check_not_input(args.out, {"--query": args.query, "--reference": args.reference,
                               "--checkpoint": args.checkpoint})
    image_format(args.out)  # the output path before any work: a known image type, writable
    check_writable(args.out)
    # one writer per --out: a second run onto the same figure stops at once (both used to
    # finish, one figure silently lost)
    with output_lock(args.out, what=f"--out {show_path(args.out)}: another visualize is "
                     "writing it", hint="wait for it to end, or choose another --out"):
        if os.path.lexists(args.out):  # (before: replaced without a word)
            if not is_our_figure(args.out):  # (twenty-second probe V14: a user's photo, gone)
                fmt = image_format(args.out)
                why = "" if fmt in _MARK_KEYS else f", and a .{fmt} file cannot say it is one"
                raise ConfigError(
                    f"--out {show_path(args.out)}: exists and is not a figure of "
                    f"emit_jax.visualize (it replaces only its own{why}); choose another "
                    "--out, or remove the file first")
            print(f"note: --out {show_path(args.out)} exists; it is replaced when the figure "
                  "is drawn", file=sys.stderr, flush=True)
        heat, info = _figure(args)
    i, j = np.unravel_index(int(np.argmax(heat)), heat.shape)
    info.update(out=args.out, peak_cell=[int(i), int(j)], peak=float(heat.max()),
                median=float(np.median(heat)))
    cli.finished("emit_jax.visualize")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    cli.command(main, prog="emit_jax.visualize")
