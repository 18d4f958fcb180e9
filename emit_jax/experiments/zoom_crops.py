"""Where the zoom image's crop lands (``data.zoom``): how often it holds the defect, by the map
that places it.

    python -m emit_jax.experiments.zoom_crops [--layers 1,2,4,5 1,2 ...] [--rotations 4 ...]
        [--share 0.35] [--unseen 1] [--checkpoint DIR] [--json]

For every anomalous image of the embedded default's test split and of ``--unseen`` embedded
datasets no stage saw, the query is paired with its normal reference as the held-out questions
pair it, and the crop is cut as :class:`emit_jax.training.zoom.Zoomer` cuts it (the square of
``--share`` of the side around the heat map's maximum, moved inside the image). Per map (each
``--layers`` set of ViT blocks with each ``--rotations`` count, the rest of EMIT's settings as
the main job's config has them), it prints the share of crops that touch the true mask (a label
used only here, to score) and the milliseconds per pair the map took (batches of 16, after the
compile). The ViT is the one the main job starts from (the packaged label-free ViT), or the
``--checkpoint``'s.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time

import numpy as np

from emit_jax import cli


def touches(mask: np.ndarray, heat: np.ndarray, share: float) -> bool:
    """Whether the crop :func:`emit_jax.training.zoom.hot_crop` cuts from an image of
    ``mask``'s size holds a pixel of the boolean ``mask``."""
    from PIL import Image

    from emit_jax.training.zoom import hot_crop

    return bool(np.asarray(hot_crop(Image.fromarray(mask), heat, share)).any())


def measure(vit, pairs, emit_cfg, variants, share: float, batch: int = 16) -> list[dict]:
    """``pairs``: (query path, reference path, mask path); ``variants``: (layers, rotations).
    One row per variant: ``layers``, ``rotations``, ``touch`` (%), ``ms_per_pair``."""
    import jax.numpy as jnp
    from flax import nnx

    from emit_jax.data.image import load_image, to_tile
    from emit_jax.models.emit import config_heatmap

    size = vit.cfg.image_size
    ce = np.stack([np.stack([to_tile(load_image(r), size), to_tile(load_image(q), size)])
                   for q, r, _ in pairs])
    masks = [np.asarray(load_image(m).convert("L")) > 127 for _, _, m in pairs]
    pad = (-len(ce)) % batch
    ce = np.concatenate([ce, np.repeat(ce[-1:], pad, 0)]) if pad else ce
    rows = []
    for layers, rotations in variants:
        c = dataclasses.replace(emit_cfg, ce_layers=tuple(layers), rotations=rotations)
        c.layers_for(vit.cfg.num_hidden_layers)  # a block past the ViT: its error, here
        fn = nnx.jit(lambda v, x, c=c: config_heatmap(v, x, c))
        fn(vit, jnp.asarray(ce[:batch])).block_until_ready()  # the compile, not timed
        t0 = time.perf_counter()
        heat = np.concatenate([np.asarray(fn(vit, jnp.asarray(ce[i:i + batch])))
                               for i in range(0, len(ce), batch)])[:len(pairs)]
        ms = 1000 * (time.perf_counter() - t0) / len(ce)
        hit = [touches(m, h, share) for m, h in zip(masks, heat)]
        rows.append({"layers": list(layers), "rotations": rotations,
                     "touch": 100.0 * float(np.mean(hit)), "ms_per_pair": ms})
    return rows


def held_out_pairs(unseen: int) -> list[tuple[str, str, str]]:
    """(query, reference, mask) of the anomalous DC questions of the test split (the main job's
    records, built here) and of ``unseen`` unseen datasets."""
    from emit_jax.data.embedded import ensure_cached
    from emit_jax.data.mvtec import scan
    from emit_jax.training import data as stage_data

    masks = {}
    with tempfile.TemporaryDirectory() as work:
        root = ensure_cached(seed=0)
        recs = stage_data.stage_records(root, work, domain_knowledge=False)["test"]
    recs += stage_data.unseen_records(unseen, tasks_=("defect_classification",))
    for s in [0] + list(range(stage_data.UNSEEN_SEED0, stage_data.UNSEEN_SEED0 + unseen)):
        masks.update({it.path: it.mask_path for it in scan(ensure_cached(seed=s))
                      if it.is_anomalous})
    return [(r["images"][1], r["images"][0], masks[r["images"][1]]) for r in recs
            if r["task_type"] == "defect_classification"]


def main(argv=None) -> int:
    from emit_jax.configs import grpo
    from emit_jax.models.emit import EMITConfig

    p = cli.Parser(prog="python -m emit_jax.experiments.zoom_crops",
                   description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=["1,2,4,5", "1,2"],
                   help="ViT block sets of the map, each comma-separated (default: EMIT's four "
                        "CE layers scaled to the tiny ViT, and the recipe's 1,2)")
    p.add_argument("--rotations", nargs="+", type=cli.int_in(1, 4), default=[4])
    p.add_argument("--share", type=float, default=0.35)
    p.add_argument("--unseen", type=cli.int_in(0, 20), default=1)
    p.add_argument("--checkpoint", default="", help="emit_jax or HF checkpoint whose ViT places "
                   "the crops (default: the ViT the main job starts from)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        layer_sets = [tuple(int(b) for b in s.split(",")) for s in args.layers]
    except ValueError:
        p.error(f"--layers: {' '.join(args.layers)}: each a comma-separated list of block numbers")
    if not 0.0 < args.share <= 1.0:
        p.error(f"--share {args.share}: must be in (0, 1]")
    cfg = grpo.get_config()
    if args.checkpoint:
        from emit_jax import checkpoint

        model = checkpoint.load_model_folder(args.checkpoint)[0]
        vit = getattr(model, "mllm", model).vision_tower
    else:
        from emit_jax.data.tokenizer import train_tiny_tokenizer
        from emit_jax.training import stages

        with tempfile.TemporaryDirectory() as tok_dir:
            vit = stages.build_initial_model(cfg, train_tiny_tokenizer(None, tok_dir)).vision_tower
    pairs = held_out_pairs(args.unseen)
    variants = [(layers, r) for layers in layer_sets for r in args.rotations]
    try:
        rows = measure(vit, pairs, EMITConfig(**dict(cfg.emit.items())).validate(), variants,
                       args.share)
    except ValueError as e:
        p.error(f"--layers: {e}".replace("ce_layers ", ""))
    if args.json:
        print(json.dumps({"pairs": len(pairs), "share": args.share, "rows": rows}))
        return 0
    print(f"{len(pairs)} anomalous held-out DC questions (test split + {args.unseen} unseen "
          f"dataset(s)), crops of {args.share} of the side")
    print("| ViT blocks of the map | rotations | crop touches the defect (%) | ms per pair |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {','.join(map(str, r['layers']))} | {r['rotations']} | {r['touch']:.1f} | "
              f"{r['ms_per_pair']:.1f} |")
    return 0


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.zoom_crops")
