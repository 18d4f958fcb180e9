"""Write a checkpoint's ViT as a vision-tower file that ``train --config.vision_init=FILE`` reads.

    python -m emit_jax.experiments.vit_asset --checkpoint VIT --out FILE.safetensors

``--checkpoint`` is a model folder (``vit_pretrain``'s ``--out``, a stage's ``model``, or a
Hugging Face folder); ``--out`` gets its ``vision_tower.*`` tensors (transformers' keys and
layouts, float32) with the checkpoint's ``vit_pretrain`` settings, the architectures whose ViT
it fits and ``--note`` in the file's metadata (``emit_jax.training.vision_init``). The ViT the package ships
for the embedded default (``vision_init='embedded'``) was written so::

    python -m emit_jax.experiments.vit_pretrain --out VIT --steps 600 --temperature 0.05 --rotate 180
    python -m emit_jax.experiments.vit_asset --checkpoint VIT \\
        --out emit_jax/assets/vit_tiny_embedded_label_free.safetensors
"""

from __future__ import annotations

import os
import sys

from emit_jax import cli

PROG = "python -m emit_jax.experiments.vit_asset"


def main(argv=None) -> int:
    from emit_jax import checkpoint
    from emit_jax.models import architectures
    from emit_jax.training import vision_init

    ap = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="model folder (vit_pretrain's --out)")
    ap.add_argument("--out", required=True, type=cli.output_folder,
                    help="the .safetensors file to write (replaced whole if it exists)")
    ap.add_argument("--note", default="", help="a line of provenance kept in the metadata")
    args = ap.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        ap.error(f"argument --out: {args.out!r} does not end in .safetensors")
    src = args.checkpoint
    if not os.path.isdir(src):
        ap.error(f"argument --checkpoint: {src!r} is not a folder")
    model, meta = checkpoint.load_model_folder(src)
    model = getattr(model, "mllm", model)
    vision = model.config.vision
    archs = [name for name, make in sorted(architectures.ARCHITECTURES.items())
             if make().vision == vision]  # the architectures whose ViT this is
    info = {"vit_pretrain": meta.get("vit_pretrain"), "archs": archs,
            "vision": {k: getattr(vision, k) for k in ("hidden_size", "num_hidden_layers",
                                                       "image_size", "patch_size")},
            "note": args.note}
    vision_init.save_vision(model, args.out, info)
    print(f"wrote {args.out} ({len(vision_init.vision_tensors(model))} tensors of "
          f"{os.path.basename(os.path.normpath(src))}'s vision tower)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.command(main, prog=PROG)
