"""Train the ViT without labels so that the contrastive heat map tells defects from normal
variation: dense (patch-level) contrastive learning on two warped views of each image.

    python -m emit_jax.experiments.vit_pretrain --out DIR [--steps 600] [--arch tiny]
    python -m emit_jax.experiments.heatmap_auroc --checkpoint DIR

The contrastive heat map (``emit_jax.models.emit.contrastive_heatmap``) scores a query patch by
its smallest cosine distance to the reference's patches in a window. On the embedded default a
random ViT's features separate anomalous from normal queries only as well as the raw pixels do
(AUROC of the map's maximum 0.80-0.85, docs/training.md): each normal image is the object
shifted, rotated and scaled, with its own grain, so corresponding normal patches differ about
as much as a defect differs from them. This experiment asks the ViT for patch features that stay
the same under that normal variation and differ between the parts of an image:

- every step draws ``--batch`` images of the stage-2 training split (its questions' queries and
  references; with ``--fresh N`` also every image of the fresh embedded datasets of seeds 1..N,
  stage 1's; no label is read, no validation, test or unseen image is used) and warps each twice
  (:func:`random_warp`: rotation within +-``--rotate`` degrees, shift within +-``--shift``
  pixels, scale within +-``--scale``, exposure gain and pixel grain), the normal variation of
  the embedded generator;
- patch ``i`` of view A corresponds to the point of view B that shows the same image point
  (:func:`correspondence`); view B's features there are read bilinearly from its patch grid;
- the loss (:func:`dense_infonce`) at each of EMIT's CE blocks (the ones the heat map reads) is
  the InfoNCE of every patch of view A against view B's features at all of view A's patches
  of the same image (temperature ``--temperature``): the corresponding point is the positive,
  the image's other patches the negatives. Patches whose point falls outside view B are left
  out.

The ViT's weights are trained (Adam, cosine schedule); the LLM stays as initialised. ``--out``
is a model checkpoint (``emit_jax.checkpoint.save_model``), with the dataset's tokenizer (the
one a training run on it builds) in its assets, that ``heatmap_auroc --checkpoint`` and ``train
--config.init_from`` read. ``--json`` prints the loss curve as one JSON object.
Ctrl-C (or SIGTERM) stops after the step in progress and writes the ViT of the steps done (its
meta's ``steps_done`` says how many); a second one stops at once, nothing written.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time

import numpy as np

from emit_jax import cli
from emit_jax.errors import exit_interrupted, stop_signals_held

PROG = "python -m emit_jax.experiments.vit_pretrain"

IMAGE_SPLIT = "grpo"  # the stage-2 training split: the only images this experiment reads


# ------------------------------------------------------------------------------ pure functions
def random_warp(rng: np.random.Generator, size: int, rotate: float, shift: float,
                scale: float) -> np.ndarray:
    """A random similarity transform as the 3x3 matrix mapping a view's pixel ``(x, y, 1)`` to
    the source image's pixel: rotation about the centre within ``+-rotate`` degrees, scale
    within ``1 +- scale``, shift within ``+-shift`` pixels."""
    a = math.radians(rng.uniform(-rotate, rotate))
    s = 1.0 + rng.uniform(-scale, scale)
    dx, dy = rng.uniform(-shift, shift, 2)
    c = (size - 1) / 2.0
    cos, sin = math.cos(a) / s, math.sin(a) / s
    # source = R/s (view - c) + c + d
    return np.array([[cos, -sin, c - cos * c + sin * c + dx],
                     [sin, cos, c - sin * c - cos * c + dy],
                     [0.0, 0.0, 1.0]])


def warp_image(image: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``image [3, H, W]`` resampled through ``m`` (view pixel -> source pixel; bilinear; points
    outside the source take the nearest edge pixel) -> ``[3, H, W]``."""
    from scipy import ndimage

    # ndimage indexes (row, col) = (y, x): swap the matrix's axes
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], np.float64)
    ms = swap @ m @ swap
    return np.stack([ndimage.affine_transform(ch, ms[:2, :2], offset=ms[:2, 2], order=1,
                                              mode="nearest") for ch in image]).astype(np.float32)


def correspondence(ma: np.ndarray, mb: np.ndarray, grid: int, patch: int) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """Where view B shows the centre of each of view A's ``grid x grid`` patches.

    ``ma``, ``mb``: the views' view -> source matrices (:func:`random_warp`). Returns
    ``pos [grid*grid, 2]``: the point in view B's patch-grid coordinates (row, col; patch
    ``(r, c)``'s centre is ``(r, c)``), row-major over view A's patches, and ``valid
    [grid*grid]``: the point lies inside view B's patch-centre grid."""
    r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    xa = np.stack([(c.ravel() + 0.5) * patch - 0.5, (r.ravel() + 0.5) * patch - 0.5,
                   np.ones(grid * grid)])  # pixel centres (x, y, 1)
    xb = np.linalg.solve(mb, ma @ xa)  # source -> view B
    col = (xb[0] + 0.5) / patch - 0.5
    row = (xb[1] + 0.5) / patch - 0.5
    pos = np.stack([row, col], -1)
    valid = (row >= 0) & (row <= grid - 1) & (col >= 0) & (col <= grid - 1)
    return pos.astype(np.float32), valid


def bilinear(grid_feats, pos):
    """``grid_feats [n, g, g, D]`` read at ``pos [n, P, 2]`` (row, col; clipped to the grid)
    -> ``[n, P, D]``."""
    import jax.numpy as jnp

    g = grid_feats.shape[1]
    p = jnp.clip(pos, 0.0, g - 1.0)
    r0 = jnp.clip(jnp.floor(p[..., 0]).astype(jnp.int32), 0, g - 2)
    c0 = jnp.clip(jnp.floor(p[..., 1]).astype(jnp.int32), 0, g - 2)
    fr, fc = (p[..., 0] - r0)[..., None], (p[..., 1] - c0)[..., None]
    take = jnp.vectorize(lambda f, r, c: f[r, c], signature="(g,g,d),(),()->(d)")
    f = lambda dr, dc: take(grid_feats[:, None], r0 + dr, c0 + dc)  # noqa: E731
    return ((1 - fr) * (1 - fc) * f(0, 0) + (1 - fr) * fc * f(0, 1)
            + fr * (1 - fc) * f(1, 0) + fr * fc * f(1, 1))


def dense_infonce(fa, fb_at, valid, temperature: float):
    """InfoNCE of each of view A's patches against view B's features at view A's patches.

    ``fa [n, P, D]``: view A's patch features; ``fb_at [n, P, D]``: view B's features at the
    points corresponding to view A's patches (:func:`bilinear`); ``valid [n, P]``. For patch
    ``i`` of image ``k`` the logits are ``cos(fa[k, i], fb_at[k, j]) / temperature`` over the
    valid ``j`` of the same image, the target ``j = i``. Returns the mean over valid ``i``."""
    import jax
    import jax.numpy as jnp

    a = fa / jnp.maximum(jnp.linalg.norm(fa, axis=-1, keepdims=True), 1e-6)
    b = fb_at / jnp.maximum(jnp.linalg.norm(fb_at, axis=-1, keepdims=True), 1e-6)
    logits = jnp.einsum("npd,nqd->npq", a, b) / temperature
    logits = jnp.where(valid[:, None, :], logits, -1e9)
    logp = jax.nn.log_softmax(logits, axis=-1)
    diag = jnp.diagonal(logp, axis1=1, axis2=2)  # [n, P]
    w = valid.astype(logits.dtype)
    return -(diag * w).sum() / jnp.maximum(w.sum(), 1.0)


# ------------------------------------------------------------------------------ the experiment
def training_images(root: str, fresh: int = 0) -> list[str]:
    """The distinct images (queries and references) of the stage-2 training split's
    anomaly-discrimination questions, then every image of the ``fresh`` embedded datasets
    drawn with seeds 1 .. ``fresh`` (the ones stage 1 adds with ``sft.fresh_datasets``; never
    the validation, test or unseen images)."""
    from emit_jax.training.data import fresh_records, stage_records

    with tempfile.TemporaryDirectory() as work:
        records = stage_records(root, work, domain_knowledge=False)
    paths = sorted({p for r in records[IMAGE_SPLIT] for p in r["images"]})
    if fresh:
        paths += sorted({p for r in fresh_records(range(1, fresh + 1)) for p in r["images"]})
    return paths


def tile_loader(paths: list[str], size: int):
    """``k -> paths[k]`` as a CE tile ``[3, size, size]`` (float32), the 512 last used kept."""
    import functools

    from emit_jax.data.image import load_image, to_tile

    @functools.lru_cache(maxsize=512)
    def tile(k: int) -> np.ndarray:
        return to_tile(load_image(paths[k]), size)

    return tile


def main(argv=None) -> int:
    from emit_jax.fileio import check_new_folder, check_not_input, output_lock
    from emit_jax.models import architectures

    ap = cli.Parser(prog=PROG,
                    description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=cli.output_folder,
                    help="model checkpoint to write (a new folder)")
    ap.add_argument("--arch", default="tiny", choices=sorted(architectures.ARCHITECTURES))
    ap.add_argument("--data", default="", help="MVTec-style folder (default: the embedded set)")
    ap.add_argument("--fresh", type=cli.nonneg_int, default=0,
                    help="also every image of this many fresh embedded datasets (seeds 1..N, "
                         "as stage 1's sft.fresh_datasets); embedded default only")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--steps", type=cli.positive_int, default=600)
    ap.add_argument("--batch", type=cli.positive_int, default=16, help="images per step")
    ap.add_argument("--lr", type=cli.positive_float, default=1e-3)
    ap.add_argument("--temperature", type=cli.positive_float, default=0.1)
    ap.add_argument("--rotate", type=cli.nonneg_float, default=45.0, help="degrees")
    ap.add_argument("--shift", type=cli.nonneg_float, default=14.0, help="pixels")
    ap.add_argument("--scale", type=cli.nonneg_float, default=0.05)
    ap.add_argument("--gain", type=cli.nonneg_float, default=0.1, help="exposure gain's spread")
    ap.add_argument("--grain", type=cli.nonneg_float, default=0.05,
                    help="pixel noise's standard deviation (normalised units)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    out = args.out
    try:
        check_new_folder(out, hint="choose a new checkpoint path")
    except FileExistsError as e:
        ap.error(f"argument --out: {e}")
    # not into the data, nor a training workdir's stage folders, which its runs replace
    # (twenty-ninth probe V22: written as WORKDIR/sft/model, then replaced by train silently)
    check_not_input(out, {"--data": args.data or None})
    if args.fresh and args.data:
        ap.error("argument --fresh: fresh datasets are drawn by the embedded generator; not "
                 "used with --data")

    # held from here (twenty-ninth probe U4: a second run on the same --out trained to the end,
    # then was refused at the write)
    with output_lock(out, what=f"--out {out}: another vit_pretrain is writing it",
                     hint="wait for it to end, or choose another --out"):
        check_new_folder(out, hint="choose a new checkpoint path")  # (filled meanwhile)
        with tempfile.TemporaryDirectory() as work:
            return _train(args, out, work)


def _train(args, out: str, work: str) -> int:
    """The training and the write of ``main``, its arguments checked and ``--out`` locked;
    ``work``: a scratch folder (the tokenizer is built there)."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from emit_jax import checkpoint
    from emit_jax.data.embedded import ensure_cached
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMITConfig
    from emit_jax.training.data import tokenizer_for
    from emit_jax.training.stages import fitted_model

    cfg = architectures.get_config(args.arch)
    root = args.data or ensure_cached()
    # the model a training run on this dataset builds (stages.build_initial_model): its
    # vocabulary fitted to the dataset's tokenizer, which goes into the checkpoint's assets, so
    # train --config.init_from reads the checkpoint as it is
    tokenizer = tokenizer_for(work, root)
    model = fitted_model(cfg, tokenizer, args.seed)
    vit = model.vision_tower
    layers = EMITConfig().layers_for(cfg.vision.num_hidden_layers)
    size, patch, g = cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.grid
    paths = training_images(root, args.fresh)
    tile = tile_loader(paths, size)
    where = "the stage-2 training split" + (f" and {args.fresh} fresh embedded dataset"
                                           f"{'s' if args.fresh > 1 else ''}" if args.fresh else "")
    print(f"{len(paths)} images of {where}; CE blocks {list(layers)}; "
          f"{args.steps} steps of {args.batch}", file=sys.stderr)

    # a tenth of the steps (50 at most) of warm-up; none for fewer than 10 steps (twenty-ninth
    # probe V12: --steps 1 left the cosine no step, optax's ValueError traceback)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(50, args.steps // 10),
                                                  args.steps)
    opt = nnx.Optimizer(vit, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)

    @nnx.jit
    def step(vit, opt, va, vb, pos, valid):
        def loss_fn(vit):
            n = va.shape[0]
            _, hidden = vit(jnp.concatenate([va, vb]), output_hidden_states=True,
                            num_layers=max(layers), hidden_layers=tuple(layers))
            total = 0.0
            for l in layers:
                h = hidden[l][:, 1:]  # [2n, P, D]
                fb = h[n:].reshape(n, g, g, -1)
                total = total + dense_infonce(h[:n], bilinear(fb, pos), valid, args.temperature)
            return total / len(layers)

        loss, grads = nnx.value_and_grad(loss_fn)(vit)
        opt.update(vit, grads)
        return loss

    rng = np.random.default_rng(args.seed)
    curve, t0 = [], time.time()
    # a first signal stops after the step in progress (the steps done are written below), a
    # second one at once
    with stop_signals_held(lambda signum: _stopped_at_once(signum, len(curve), args.steps),
                           several=False) as got:
        for i in range(args.steps):
            idx = rng.choice(len(paths), args.batch, replace=len(paths) < args.batch)
            views, pos, valid = [[], []], [], []
            for k in idx:
                ms = [random_warp(rng, size, args.rotate, args.shift, args.scale) for _ in range(2)]
                for v, m in zip(views, ms):
                    x = warp_image(tile(int(k)), m) * rng.normal(1.0, args.gain)
                    v.append(x + rng.normal(0.0, args.grain, x.shape).astype(np.float32))
                p, ok = correspondence(ms[0], ms[1], g, patch)
                pos.append(p)
                valid.append(ok)
            loss = float(step(vit, opt, jnp.asarray(np.stack(views[0])),
                              jnp.asarray(np.stack(views[1])), jnp.asarray(np.stack(pos)),
                              jnp.asarray(np.stack(valid))))
            if not math.isfinite(loss):
                print(f"error: the loss is {loss} at step {i + 1}; try a smaller --lr",
                      file=sys.stderr)
                return 3
            curve.append(loss)
            if (i + 1) % max(1, args.steps // 10) == 0 or i == 0:
                print(f"step {i + 1}/{args.steps} loss {loss:.4f} ({time.time() - t0:.0f} s)",
                      file=sys.stderr)
            if got:
                break
    done = len(curve)
    checkpoint.save_model(model, out, assets_from=os.path.join(work, "tokenizer"),
                          extra_meta={"vit_pretrain": {
                              **{k: v for k, v in vars(args).items()
                                 if k not in ("out", "json")}, "steps_done": done}})
    if done < args.steps:  # a signal: the steps done are kept (thirtieth probe V22: before,
        # Ctrl-C after 25 minutes of steps left nothing)
        print(cli.interrupted_line(
            PROG, f"({signal.Signals(got[0]).name}) after step {done} of {args.steps}",
            f"wrote {out}, the ViT of step {done} (a new --out trains all {args.steps} steps "
            "from the start)"), file=sys.stderr)
        return cli.INTERRUPTED
    print(f"wrote {out}", file=sys.stderr)
    if args.json:
        print(json.dumps({"out": out, "images": len(paths), "layers": list(layers),
                          "loss_first": curve[0], "loss_last": curve[-1],
                          "seconds": round(time.time() - t0, 1)}))
    return 0


def _stopped_at_once(signum: int, done: int, steps: int):
    """A second stopping signal during the steps: the process ends at once, nothing written."""
    exit_interrupted(cli.interrupted_line(
        PROG, f"({signal.Signals(signum).name}, a second signal) after step {done} of {steps}",
        "stopped at once; nothing is written"))


if __name__ == "__main__":
    cli.command(main, prog=PROG)
