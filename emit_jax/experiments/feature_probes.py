"""What the image side can tell the LLM: linear probes of the ViT's features and the heat map.

    python -m emit_jax.experiments.feature_probes [--fresh 4] [--checkpoint DIR] [--arch tiny]
        [--seed 0] [--json]

The four-option tasks ask the model to name, from the image, the object (OC), the defect type
(DC) and the defect's grid cell (DL). Before asking whether the LLM learns to read them, this
measures whether the features it is given carry them at all. Trained on the embedded default's
(seed 0) ``train`` split plus every image of ``--fresh`` further embedded datasets (seeds
1..N), tested on the seed-0 ``test`` split, each probe a softmax regression on standardised
features (:func:`softmax_probe`):

- **object, pooled image tokens**: the mean of the image's visual tokens after ``mlp1`` (what
  the LLM reads in place of ``<IMG_CONTEXT>``), every test image;
- **object, 8x8 thumbnail**: the image itself, averaged to 8 x 8 x 3 (how easy the task is);
- **cell, heat-map argmax** (no training): the 3 x 3 cell of the hottest patch of EMIT's
  contrastive heat map (query against a normal training image of its class; EMIT's CE layers
  and window scaled to the ViT) against the cell of the mask's centroid, anomalous test images;
- **defect, hottest patches**: the CE layers' query features at the heat map's 8 hottest
  patches minus the reference's mean feature, with five numbers of the map's shape;
- **defect, map shape**: those five numbers alone;
- **defect, pooled image tokens**: the query's pooled visual tokens (what the LLM reads), and
  the same of a crop of the query centred on the heat map's maximum (:func:`hot_crop`, a
  ``CROP_SHARE`` of the side, resized to the tile): whether zooming in on the defect would put
  its type in what the LLM reads (and, an oracle, of a crop centred on the true mask).

``--checkpoint`` takes an emit_jax or HF checkpoint; without it the ViT is the randomly
initialised ``--arch`` (seed ``--seed``), as in the main job, whose ViT is not trained.
"""

from __future__ import annotations

import json
import time

import numpy as np

from emit_jax import cli
from emit_jax.fileio import finite_json
from emit_jax.training.zoom import crop_at, hot_crop, hottest_cell

#: the heat map's hottest patches whose features describe the defect
TOP_PATCHES = 8
#: the side of the crop around the map's maximum, a share of the image's
CROP_SHARE = 0.35


def softmax_probe(x_train: np.ndarray, y_train, x_test: np.ndarray, y_test, *,
                  l2: float = 1e-2, steps: int = 500, lr: float = 0.5) -> tuple[float, float]:
    """Multinomial logistic regression by full-batch gradient descent on features standardised
    with the training set's mean and std. ``x_*`` ``[n, d]``, ``y_*`` labels (any hashable).
    Returns (test accuracy, chance = 1 / the number of training classes)."""
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    y = np.eye(len(classes))[[index[c] for c in y_train]]
    w, bias = np.zeros((a.shape[1], len(classes))), np.zeros(len(classes))
    for _ in range(steps):
        z = a @ w + bias
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - y) / len(a)
        w -= lr * (a.T @ g + l2 * w)
        bias -= lr * g.sum(0)
    pred = [classes[i] for i in (b @ w + bias).argmax(1)]
    return float(np.mean([p == t for p, t in zip(pred, y_test)])), 1.0 / len(classes)


def cell_of(mask: np.ndarray) -> int:
    """The 3 x 3 grid cell (row-major, 0 = top left) of a boolean mask's centroid."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("empty mask")
    h, w = mask.shape
    return int(min(2, int(ys.mean() * 3 // h)) * 3 + min(2, int(xs.mean() * 3 // w)))


def map_shape(heat: np.ndarray) -> np.ndarray:
    """Five numbers of a heat map's shape: its maximum, the mean of its 8 largest cells, its
    mean, the fraction of cells above half the maximum, its standard deviation."""
    s = np.sort(np.asarray(heat, np.float64).ravel())[::-1]
    return np.array([s[0], s[:8].mean(), s.mean(), float((s > s[0] / 2).mean()), s.std()])


def _items(seed: int, splits: tuple[str, ...]):
    """(image item, a normal training image of its class) of the seed's embedded dataset."""
    from emit_jax.data import mvtec
    from emit_jax.data.embedded import ensure_cached

    items = mvtec.scan(ensure_cached(seed=seed))
    refs: dict[str, str] = {}
    for it in items:
        if it.split == "train" and not it.is_anomalous:
            refs.setdefault(it.object_type, it.path)
    return [(it, refs[it.object_type]) for it in items if it.split in splits]


def official_heatmap(model):
    """``(jitted ce_pixels [n, 2, 3, H, W] -> heat [n, g, g], CE layers)``: EMIT's heat map
    with its CE layers and window scaled to ``model``'s ViT (an InternVL)."""
    import jax

    from emit_jax.models.emit import EMITConfig, config_heatmap

    ecfg = EMITConfig().validate()
    layers = tuple(ecfg.layers_for(model.config.vision.num_hidden_layers))
    return jax.jit(lambda ce: config_heatmap(model.vision_tower, ce, ecfg)), layers


def measure(model, train, test, *, batch: int = 8) -> dict:
    """The probes' figures (module docstring) for lists of (item, reference path)."""
    import jax
    import jax.numpy as jnp

    from emit_jax.data.image import load_image, to_tile

    size = model.config.vision.image_size
    heat_fn, layers = official_heatmap(model)
    pooled_fn = jax.jit(lambda x: model.get_image_features(x).mean(1))

    @jax.jit
    def ce_tokens(x):
        _, hidden = model.vision_tower(x, output_hidden_states=True, num_layers=max(layers),
                                       hidden_layers=layers)
        return jnp.concatenate([hidden[layer][:, 1:] for layer in layers], -1)  # [B, P, L*D]

    def features(pairs):
        out = {k: [] for k in ("pooled", "thumb", "defect", "cell_pred", "cell_true",
                               "defect_pooled", "defect_crop", "defect_crop_mask")}
        for i in range(0, len(pairs), batch):
            chunk = pairs[i:i + batch]
            pil = [load_image(it.path) for it, _ in chunk]
            q = np.stack([to_tile(im, size) for im in pil])
            r = np.stack([to_tile(load_image(ref), size) for _, ref in chunk])
            out["pooled"] += list(np.asarray(pooled_fn(jnp.asarray(q))))
            n = len(chunk)
            out["thumb"] += list(q.reshape(n, 3, 8, size // 8, 8, size // 8).mean((3, 5))
                                 .reshape(n, -1))
            heat = np.asarray(heat_fn(jnp.asarray(np.stack([r, q], 1))))
            tq, tr = np.asarray(ce_tokens(jnp.asarray(q))), np.asarray(ce_tokens(jnp.asarray(r)))
            pooled = out["pooled"][-n:]
            crops = np.asarray(pooled_fn(jnp.asarray(np.stack(
                [to_tile(hot_crop(im, h, CROP_SHARE), size) for im, h in zip(pil, heat)]))))
            for k, (it, _) in enumerate(chunk):
                if not it.is_anomalous:
                    continue
                top = np.argsort(heat[k].ravel())[-TOP_PATCHES:]
                out["defect"].append((np.concatenate([tq[k][top].mean(0) - tr[k].mean(0),
                                                      map_shape(heat[k])]), it.defect))
                mask = np.asarray(load_image(it.mask_path).convert("L")) > 127
                out["cell_pred"].append(hottest_cell(heat[k]))
                out["defect_pooled"].append((pooled[k], it.defect))
                out["defect_crop"].append((crops[k], it.defect))
                yy, xx = np.nonzero(mask)
                true_crop = crop_at(pil[k], (yy.mean() + 0.5) / mask.shape[0],
                                    (xx.mean() + 0.5) / mask.shape[1], CROP_SHARE)
                out["defect_crop_mask"].append((np.asarray(pooled_fn(jnp.asarray(
                    to_tile(true_crop, size)[None])))[0], it.defect))
                out["cell_true"].append(cell_of(mask))
        return out

    ftr, fte = features(train), features(test)
    objects = ([it.object_type for it, _ in train], [it.object_type for it, _ in test])
    res: dict = {"train_images": len(train), "test_images": len(test),
                 "test_anomalous": len(fte["defect"])}
    for name in ("pooled", "thumb"):
        acc, chance = softmax_probe(np.stack(ftr[name]), objects[0], np.stack(fte[name]),
                                    objects[1])
        res[f"object_{name}"] = {"accuracy": acc, "chance": chance}
    res["cell_heatmap_argmax"] = {"accuracy": float(np.mean(np.array(fte["cell_pred"])
                                                            == np.array(fte["cell_true"]))),
                                  "chance": 1 / 9}
    xtr, ytr = np.stack([f for f, _ in ftr["defect"]]), [d for _, d in ftr["defect"]]
    xte, yte = np.stack([f for f, _ in fte["defect"]]), [d for _, d in fte["defect"]]
    for name, cols in (("defect_hottest_patches", slice(None)), ("defect_map_shape", slice(-5, None))):
        acc, chance = softmax_probe(xtr[:, cols], ytr, xte[:, cols], yte)
        res[name] = {"accuracy": acc, "chance": chance}
    for name in ("defect_pooled", "defect_crop", "defect_crop_mask"):  # what the LLM would read
        acc, chance = softmax_probe(np.stack([f for f, _ in ftr[name]]),
                                    [d for _, d in ftr[name]],
                                    np.stack([f for f, _ in fte[name]]),
                                    [d for _, d in fte[name]])
        res[name] = {"accuracy": acc, "chance": chance}
    return res


LABELS = {"object_pooled": "object, pooled image tokens (what the LLM reads)",
          "object_thumb": "object, 8x8 thumbnail of the image",
          "cell_heatmap_argmax": "defect cell, heat-map argmax (no training)",
          "defect_hottest_patches": "defect type, CE features at the 8 hottest patches + map shape",
          "defect_map_shape": "defect type, the map's shape alone",
          "defect_pooled": "defect type, pooled image tokens of the query",
          "defect_crop": "defect type, pooled image tokens of a crop at the map's maximum",
          "defect_crop_mask": "defect type, the same of a crop at the mask's centre (an oracle)"}


def main(argv=None) -> int:
    from flax import nnx

    from emit_jax.models import architectures
    from emit_jax.models.internvl import InternVL

    p = cli.Parser(prog="python -m emit_jax.experiments.feature_probes",
                   description=__doc__.split("\n\n")[0])
    p.add_argument("--fresh", type=cli.int_in(0, 1000), default=4,
                   help="further embedded datasets (seeds 1..N) added to the probes' training set")
    p.add_argument("--checkpoint", default="", help="emit_jax or HF checkpoint (default: random)")
    p.add_argument("--arch", default="tiny", choices=sorted(architectures.ARCHITECTURES))
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.checkpoint:
        from emit_jax.experiments import warn_unused_with_checkpoint

        warn_unused_with_checkpoint(argv, ("--arch", "--seed"))

        from emit_jax import checkpoint

        model = checkpoint.load_model_folder(args.checkpoint)[0]
        model = getattr(model, "mllm", model)
    else:
        model = InternVL(architectures.get_config(args.arch), rngs=nnx.Rngs(args.seed))
    train = _items(0, ("train",))
    for s in range(1, args.fresh + 1):
        train += _items(s, ("train", "validation", "test"))
    res = measure(model, train, _items(0, ("test",)))
    res["seconds"] = round(time.time() - t0, 1)
    if args.json:
        print(json.dumps(finite_json(res)))
        return 0
    print(f"trained on {res['train_images']} images (seed 0 train + {args.fresh} fresh "
          f"datasets), tested on the {res['test_images']} test-split images "
          f"({res['test_anomalous']} anomalous); {res['seconds']} s")
    for key, label in LABELS.items():
        print(f"{label:64s} {100 * res[key]['accuracy']:5.1f}  (chance {100 * res[key]['chance']:.0f})")
    return 0


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.feature_probes")
