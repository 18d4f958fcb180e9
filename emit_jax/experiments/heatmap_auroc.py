"""How well the contrastive heat map alone separates anomalous from normal queries.

    python -m emit_jax.experiments.heatmap_auroc [--checkpoint DIR] [--data DIR] [--arch tiny]

For every anomaly-discrimination question of the stage-2 training, validation and test splits
(the embedded default unless ``--data`` names an MVTec-style folder), the heat map of the query
against its reference (``emit_jax.models.emit.contrastive_heatmap``: the model's ViT, EMIT's CE
layers scaled to its depth, the scaled window, four rotations) is reduced to a score — its
maximum, the mean of its 8 largest cells, its mean — and the AUROC of each score against the
labels is printed, with the balanced accuracy of a threshold on the maximum, one for all
questions and one per object class: fitted on the stage-2 training split, and each split's best
(the ceiling of any reading of the maximum alone, or of the maximum and the object). ``--unseen
N`` adds the questions of the N embedded datasets the main job's ``eval_unseen`` holds out;
``--fresh N`` those of stage 1's N fresh datasets (``sft.fresh_datasets``), and the thresholds
are fitted on them. ``--checkpoint`` takes an emit_jax or HF checkpoint; without it the ViT is
the randomly initialised ``--arch`` (seed ``--seed``), or ``--vision-init``'s (``embedded``: the
packaged label-free ViT of ``tiny``). ``--features pixels`` compares the raw
pixels of each patch (the ViT's patch size) instead of the ViT's features: what the images
themselves separate. The AUROC of the maximum within each object class and for each defect type
(against every normal query), over the three splits together, follows.
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


def balanced_accuracy(scores, labels, threshold) -> float:
    """Mean of the two recalls when a score >= ``threshold`` (a number, or one per score) is
    called anomalous (label 1)."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    pred = s >= threshold
    return float(0.5 * (pred[y].mean() + (~pred[~y]).mean()))


def best_threshold(scores, labels) -> tuple[float, float]:
    """The threshold on ``scores`` with the highest balanced accuracy on ``labels``, and that
    accuracy. Candidates are the midpoints between consecutive distinct scores and one beyond
    each end; of equals, the lowest. On the split it is fitted to, an upper bound for any
    reading that is a monotone function of the score."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return float("nan"), float("nan")
    u = np.unique(s)
    cands = np.concatenate([[u[0] - 1.0], (u[1:] + u[:-1]) / 2, [u[-1] + 1.0]])
    pred = s[None, :] >= cands[:, None]  # [candidates, n]
    acc = 0.5 * (pred[:, y].mean(1) + (~pred[:, ~y]).mean(1))
    i = int(np.argmax(acc))
    return float(cands[i]), float(acc[i])


def class_thresholds(classes, scores, labels) -> dict:
    """``best_threshold`` within each class (object) of ``classes``; a class with one label only
    gets none (``class_accuracy`` falls back to the threshold it is given for it)."""
    c, s, y = np.asarray(classes), np.asarray(scores, np.float64), np.asarray(labels)
    out = {}
    for k in np.unique(c):
        t = best_threshold(s[c == k], y[c == k])[0]
        if not np.isnan(t):
            out[str(k)] = t
    return out


def class_accuracy(classes, scores, labels, thresholds: dict, fallback: float) -> float:
    """Balanced accuracy when each question is judged by its class's threshold (``fallback``
    for a class ``thresholds`` lacks)."""
    return balanced_accuracy(scores, labels, np.array(
        [thresholds.get(str(k), fallback) for k in classes], np.float64))


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
    ap.add_argument("--vision-init", default="", help="without --checkpoint: the ViT's weights "
                    "from here, as train's vision_init ('embedded': the packaged label-free ViT "
                    "of tiny, a .safetensors file of a vision tower, or a model folder)")
    ap.add_argument("--data", default="", help="MVTec-style folder (default: the embedded set)")
    ap.add_argument("--layers", default=None, help="comma-separated ViT blocks (default: EMIT's, "
                    "scaled to the ViT depth)")
    ap.add_argument("--window", type=cli.nonneg_int, default=None, help="window half-width in patches "
                    "(default: EMIT's, scaled to the patch grid)")
    ap.add_argument("--features", choices=("vit", "pixels"), default="vit",
                    help="what the heat map compares: the ViT's features at --layers (default), "
                    "or the raw pixels of each patch")
    ap.add_argument("--reference-turns", type=cli.positive_int, default=1,
                    help="emit.reference_turns: the reference also turned by 90/N degrees "
                    "between its rot90s (1: EMIT's four references; not with --features pixels)")
    ap.add_argument("--feature-turns", type=cli.positive_int, default=1,
                    help="emit.feature_turns: each reference copy's ViT features also turned "
                    "between it and the next turn, N copies (no ViT pass; 1: none)")
    ap.add_argument("--align-turn", action="store_true",
                    help="emit.align_turn: of the --reference-turns, only the one nearest the "
                    "query in pixels, in its four rot90s (four ViT passes per reference)")
    ap.add_argument("--unseen", type=cli.nonneg_int, default=0,
                    help="add the AD questions of this many embedded datasets no stage sees "
                    "(the main job's eval_unseen; embedded default only)")
    ap.add_argument("--fresh", type=cli.nonneg_int, default=0,
                    help="add the AD questions of stage 1's fresh embedded datasets (seeds 1..N, "
                    "sft.fresh_datasets) and fit the thresholds on them instead of the stage-2 "
                    "training split (embedded default only)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    for flag, on in (("--reference-turns", args.reference_turns > 1),
                     ("--feature-turns", args.feature_turns > 1), ("--align-turn", args.align_turn)):
        if on and args.features == "pixels":
            ap.error(f"argument {flag}: the pixel map compares the four rot90s only")
    try:  # the config's own check (before: --align-turn alone ran EMIT's map without a word)
        EMITConfig(reference_turns=args.reference_turns, feature_turns=args.feature_turns,
                   align_turn=args.align_turn).validate()
    except ValueError as e:
        ap.error(f"argument --align-turn: {e}")
    if args.fresh and args.data:
        ap.error("argument --fresh: the fresh datasets are the embedded generator's; "
                 "leave it out with --data")
    if args.unseen and args.data:
        ap.error("argument --unseen: the unseen datasets are the embedded generator's; "
                 "leave it out with --data")
    if args.layers is not None and not args.layers.strip():  # (before: EMIT's, without a word)
        ap.error(f"argument --layers: {args.layers!r} is empty; leave the flag out for EMIT's "
                 "blocks")

    if args.checkpoint:
        from emit_jax.experiments import warn_unused_with_checkpoint

        warn_unused_with_checkpoint(argv, ("--arch", "--seed", "--vision-init"))

        from emit_jax import checkpoint

        model = checkpoint.load_model_folder(args.checkpoint)[0]
        model = getattr(model, "mllm", model)
    else:
        model = InternVL(architectures.get_config(args.arch), rngs=nnx.Rngs(args.seed))
        if args.vision_init:
            from emit_jax.training import vision_init

            vision_init.apply_vision(model, *vision_init.read_vision(args.vision_init))
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
    if args.unseen:
        from emit_jax.training.data import unseen_records

        records["unseen"] = unseen_records(args.unseen)
    if args.fresh:
        from emit_jax.training.data import fresh_records

        records["fresh"] = fresh_records(range(1, args.fresh + 1))

    if args.features == "pixels":
        heat_fn = jax.jit(lambda ce: pixel_heatmap(ce, cfg.vision.patch_size, window))
    else:
        heat_fn = jax.jit(lambda ce: contrastive_heatmap(model.vision_tower, ce, layers, window,
                                                         turns=args.reference_turns,
                                                         feature_turns=args.feature_turns,
                                                         align_turn=args.align_turn))
    out = {"features": args.features, "layers": list(layers) if args.features == "vit" else None,
           "window": window, "splits": {}}
    every = {}  # split -> [(object class, defect type or "good", label, max)] of its questions
    maxes = {}  # split -> (the map's max per question, labels, object classes)
    for split in (("fresh",) if args.fresh else ()) + ("grpo", "validation", "test") + (
            ("unseen",) if args.unseen else ()):
        recs = [r for r in records[split]
                if r["task_type"] == "anomaly_discrimination" and len(r["images"]) == 2]
        scores, labels, rows = {k: [] for k in REDUCTIONS}, [], every.setdefault(split, [])
        for i in range(0, len(recs), 8):
            chunk = recs[i:i + 8]
            ce = np.stack([np.stack([to_tile(load_image(p), cfg.vision.image_size)
                                     for p in r["images"]]) for r in chunk])
            for r, h in zip(chunk, np.asarray(heat_fn(jnp.asarray(ce)))):
                for k, v in reduce_map(h).items():
                    scores[k].append(v)
                labels.append(int(r["adlabel"]))
                rows.append((r.get("object_type", "?"), r.get("anomaly_type") or "good",
                              int(r["adlabel"]), scores["max"][-1]))
        out["splits"][split] = {"questions": len(labels), "anomalous": int(sum(labels)),
                                **{f"auroc_{k}": auroc(scores[k], labels) for k in REDUCTIONS}}
        maxes[split] = (scores["max"], labels, [e[0] for e in rows])
    # balanced accuracy of a threshold on the max, one for all and one per object class: fitted
    # on the stage-2 training split (or stage 1's fresh questions), and each split's own best
    # (what no reading of the max alone, or of the max and the object, beats on that split)
    fit = "fresh" if args.fresh else "grpo"
    fitted = best_threshold(*maxes[fit][:2])[0]
    per_class = class_thresholds(maxes[fit][2], *maxes[fit][:2])
    for split, (s, y, c) in maxes.items():
        best_t, best_acc = best_threshold(s, y)
        out["splits"][split].update(
            balanced_max_fitted=balanced_accuracy(s, y, fitted),
            balanced_max_best=best_acc,
            balanced_max_class_fitted=class_accuracy(c, s, y, per_class, fitted),
            balanced_max_class_best=class_accuracy(c, s, y, class_thresholds(c, s, y), best_t))
    out["thresholds_fitted_on"] = fit
    out["by_class"], out["by_defect"] = breakdown(  # the embedded default's three splits
        [e for split in ("grpo", "validation", "test") for e in every[split]])
    if args.json:
        print(json.dumps(finite_json(out)))
    else:
        print(f"CE layers {out['layers']}, window {out['window']}" if args.features == "vit"
              else f"raw pixels of each patch, window {out['window']}")
        for split, row in out["splits"].items():
            head = f"{split:10s} {row['questions']:4d} questions ({row['anomalous']} anomalous)  "
            if row["anomalous"] in (0, row["questions"]):  # (twenty-fourth probe EX1: "nan")
                print(head + "AUROC n/a (it needs normal and anomalous questions)")
                continue
            print(head + "  ".join(f"AUROC {k} {row[f'auroc_{k}']:.3f}" for k in REDUCTIONS)
                  + "  balanced accuracy of a threshold on the max (one / per object class): "
                  f"fitted on {out['thresholds_fitted_on']} {100 * row['balanced_max_fitted']:.1f}"
                  f" / {100 * row['balanced_max_class_fitted']:.1f}, the split's best "
                  f"{100 * row['balanced_max_best']:.1f} / "
                  f"{100 * row['balanced_max_class_best']:.1f}")
        print("AUROC of the max within each object class (grpo, validation, test): " + ", ".join(
            f"{c} {v['auroc_max']:.3f} ({v['anomalous']}/{v['questions']})"
            for c, v in out["by_class"].items()))
        print("AUROC of the max for each defect type against every normal query (the same): " + ", ".join(
            f"{t} {v['auroc_max']:.3f} ({v['anomalous']})" for t, v in out["by_defect"].items()))
    return 0


def breakdown(every: list[tuple[str, str, int, float]]) -> tuple[dict, dict]:
    """``[(object class, defect type, label, score)]`` -> the AUROC within each class, and of
    each defect type's queries against every normal query."""
    by_class = {}
    for c in sorted({e[0] for e in every}):
        rows = [e for e in every if e[0] == c]
        by_class[c] = {"questions": len(rows), "anomalous": sum(e[2] for e in rows),
                       "auroc_max": auroc([e[3] for e in rows], [e[2] for e in rows])}
    normal = [e[3] for e in every if not e[2]]
    by_defect = {}
    for t in sorted({e[1] for e in every if e[2]}):
        s = [e[3] for e in every if e[2] and e[1] == t]
        by_defect[t] = {"anomalous": len(s),
                        "auroc_max": auroc(s + normal, [1] * len(s) + [0] * len(normal))}
    return by_class, by_defect


def pixel_heatmap(ce_pixels, patch: int, window: int, rotations: int = 4):
    """``contrastive_heatmap`` with the raw pixels of each ``patch`` x ``patch`` patch (its
    3 * patch**2 values) in the ViT features' place: ``[n, 2, 3, H, W]`` -> ``[n, H/p, W/p]``."""
    import jax.numpy as jnp

    from emit_jax.models.emit import anomaly_map, rotations_of

    n, _, c, hh, ww = ce_pixels.shape
    g = hh // patch

    def patches(x):  # [m, 3, H, W] -> [m, g, g, 3 * patch**2]
        m = x.shape[0]
        return x.reshape(m, c, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5).reshape(
            m, g, g, c * patch * patch)

    refs = rotations_of(ce_pixels[:, 0], rotations).reshape(n * rotations, c, hh, ww)
    q = patches(ce_pixels[:, 1])[None]
    r = patches(refs).reshape(1, n, rotations, g, g, -1)
    return anomaly_map(jnp.asarray(q, jnp.float32), jnp.asarray(r, jnp.float32), window)


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.heatmap_auroc")
