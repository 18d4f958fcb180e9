"""How well the contrastive heat map alone separates anomalous from normal queries.

    python -m emit_jax.experiments.heatmap_auroc [--checkpoint DIR] [--data DIR] [--arch tiny]

For every anomaly-discrimination question of the stage-2 training, validation and test splits
(the embedded default unless ``--data`` names an MVTec-style folder), the heat map of the query
against its reference (``emit_jax.models.emit.contrastive_heatmap``: the model's ViT, EMIT's CE
layers scaled to its depth, the scaled window, four rotations) is reduced to a score — its
maximum, the mean of its 8 largest cells, its mean — and the AUROC of each score against the
labels is printed. ``--checkpoint`` takes an emit_jax or HF checkpoint; without it the ViT is
the randomly initialised ``--arch`` (seed ``--seed``).
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np

from emit_jax import cli
from emit_jax.fileio import finite_json
from emit_jax.errors import ConfigError

REDUCTIONS = ("max", "top8_mean", "mean")


def auroc(scores, labels) -> float:
    """Probability that a random positive outscores a random negative (ties count 1/2)."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def reduce_map(heat: np.ndarray) -> dict[str, float]:
    flat = np.sort(np.asarray(heat, np.float64).ravel())
    return {"max": float(flat[-1]), "top8_mean": float(flat[-8:].mean()), "mean": float(flat.mean())}


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emit_jax.data.embedded import ensure_cached
    from emit_jax.data.image import load_image, to_tile
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMITConfig, contrastive_heatmap
    from emit_jax.models.internvl import InternVL
    from emit_jax.training.data import stage_records

    ap = cli.Parser(prog="python -m emit_jax.experiments.heatmap_auroc",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="", help="emit_jax or HF checkpoint (default: random)")
    ap.add_argument("--arch", default="tiny", choices=sorted(architectures.ARCHITECTURES))
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--data", default="", help="MVTec-style folder (default: the embedded set)")
    ap.add_argument("--layers", default=None, help="comma-separated ViT blocks (default: EMIT's, "
                    "scaled to the ViT depth)")
    ap.add_argument("--window", type=cli.nonneg_int, default=None, help="window half-width in patches "
                    "(default: EMIT's, scaled to the patch grid)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.layers is not None and not args.layers.strip():  # (before: EMIT's, without a word)
        ap.error(f"argument --layers: {args.layers!r} is empty; leave the flag out for EMIT's "
                 "blocks")

    if args.checkpoint:
        import os

        from emit_jax.experiments import warn_unused_with_checkpoint

        warn_unused_with_checkpoint(argv, ("--arch", "--seed"))

        from emit_jax import checkpoint, hf

        model = hf.load(args.checkpoint) if os.path.isfile(os.path.join(args.checkpoint, "config.json")) \
            else checkpoint.load_model(args.checkpoint)[0]
        model = getattr(model, "mllm", model)
    else:
        model = InternVL(architectures.get_config(args.arch), rngs=nnx.Rngs(args.seed))
    cfg = model.config
    try:  # before: ValueError tracebacks for --layers 0,99 or x
        if args.layers and not all(x.strip().isdigit() for x in args.layers.split(",")):
            raise ValueError("expected comma-separated ViT block numbers, e.g. 2,4,6")
        ecfg = EMITConfig(ce_layers=tuple(int(x) for x in args.layers.split(",")) if args.layers
                          else None, window=args.window).validate()
        layers = ecfg.layers_for(cfg.vision.num_hidden_layers)
        window = ecfg.window_for(cfg.vision.grid)
        if window >= cfg.vision.grid:  # as visualize says it
            print(f"note: --window {window} reaches past the {cfg.vision.grid}x{cfg.vision.grid} "
                  "heat-map grid: each patch is compared with every reference patch (the same "
                  f"map as --window {cfg.vision.grid - 1})", file=sys.stderr)
    except ValueError as e:
        raise ConfigError(f"--layers {args.layers}: {e}" if args.layers else str(e)) from None
    root = args.data or ensure_cached()
    with tempfile.TemporaryDirectory() as work:
        records = stage_records(root, work, domain_knowledge=False)

    heat_fn = jax.jit(lambda ce: contrastive_heatmap(model.vision_tower, ce, layers, window))
    out = {"layers": list(layers), "window": window, "splits": {}}
    for split in ("grpo", "validation", "test"):
        recs = [r for r in records[split]
                if r["task_type"] == "anomaly_discrimination" and len(r["images"]) == 2]
        scores, labels = {k: [] for k in REDUCTIONS}, []
        for i in range(0, len(recs), 8):
            chunk = recs[i:i + 8]
            ce = np.stack([np.stack([to_tile(load_image(p), cfg.vision.image_size)
                                     for p in r["images"]]) for r in chunk])
            for r, h in zip(chunk, np.asarray(heat_fn(jnp.asarray(ce)))):
                for k, v in reduce_map(h).items():
                    scores[k].append(v)
                labels.append(int(r["adlabel"]))
        out["splits"][split] = {"questions": len(labels), "anomalous": int(sum(labels)),
                                **{f"auroc_{k}": auroc(scores[k], labels) for k in REDUCTIONS}}
    if args.json:
        print(json.dumps(finite_json(out)))
    else:
        print(f"CE layers {out['layers']}, window {out['window']}")
        for split, row in out["splits"].items():
            head = f"{split:10s} {row['questions']:4d} questions ({row['anomalous']} anomalous)  "
            if row["anomalous"] in (0, row["questions"]):  # (twenty-fourth probe EX1: "nan")
                print(head + "AUROC n/a (it needs normal and anomalous questions)")
                continue
            print(head + "  ".join(f"AUROC {k} {row[f'auroc_{k}']:.3f}" for k in REDUCTIONS))
    return 0


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.heatmap_auroc")
