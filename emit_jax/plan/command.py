"""``python -m emit_jax.plan``: the command line (flags, the one-line errors, exit 2 on bad
input)."""

from __future__ import annotations

import math
import sys
from typing import Sequence

from emit_jax import cli, configs
from emit_jax.errors import ConfigError, PlanError
from emit_jax.plan.devices import DEVICES
from emit_jax.plan.mesh import resolve_mesh
from emit_jax.plan.report import format_report, make_report, to_json

PROG = "emit_jax.plan"
DESCRIPTION = "Per-device memory plan of a training config on a mesh, before any weight is loaded."


def _parser() -> cli.Parser:
    p = cli.Parser(prog="python -m emit_jax.plan", description=DESCRIPTION, error_type=PlanError)
    p.add_argument("--config", required=True, help="ml_collections config file (path[:arg])")
    p.add_argument("--mesh", default="fsdp=1", help='e.g. "fsdp=8", "data=2,fsdp=4"')
    p.add_argument("--devices", type=cli.int_in(1, cli.MAX_DEVICES), default=None,
                   help="device count (default: the product of the --mesh sizes)")
    p.add_argument("--device", default="a100-80g", help=", ".join(DEVICES))
    p.add_argument("--headroom", type=cli.percent, default=10.0,
                   help="percent of memory reserved")
    p.add_argument("--stage", default=None, help="plan this stage (default: the largest)")
    p.add_argument("--prompt_len", type=cli.int_in(1, cli.MAX_TOKENS), default=None,
                   help="prompt tokens (default: the largest data.length_buckets)")
    p.add_argument("--label_tokens", type=cli.int_in(1, cli.MAX_TOKENS), default=128,
                   help="SFT label positions per row")
    p.add_argument("--images_per_sample", type=cli.nonneg_int, default=2)
    p.add_argument("--reference", choices=("copy", "shared"), default=None,
                   help="grpo/sft2 on a mesh: arrays shared with the policy (the code) or a "
                        "separate copy of all weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. grpo.G=4 (repeatable; --config.grpo.G=4, as "
                   "train takes it, works too)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # train's --config.KEY=VALUE form too, as aot takes it (before: "unrecognized arguments")
        rest, overrides = configs.split_overrides(argv)
        args = _parser().parse_args(rest)
        if args.device not in DEVICES:
            raise PlanError(f"unknown device {args.device!r}; known: {', '.join(DEVICES)}")
        cfg = configs.load(args.config, overrides + list(args.set))
        from emit_jax.training.validate import (  # noqa: PLC0415
            check_batch_split, check_context, check_emit, check_kernels_and_mesh,
            check_length_buckets,
            check_stages, stage_settings, unknown_key_line, unknown_keys)

        for key in unknown_keys(cfg):  # as train says it (a typo inside a config file)
            print(unknown_key_line(key), file=sys.stderr)
        mesh = resolve_mesh(args.mesh, args.devices)
        # the config's stages as train takes them (before: ('grpo', 'grpo') was planned)
        planned = [args.stage] if args.stage else list(check_stages(cfg))
        from emit_jax.training.config import STAGES  # noqa: PLC0415

        if args.stage in STAGES and args.stage not in (cfg.get("stages") or ()):  # (not said)
            print(f"note: --stage {args.stage}: not among the config's stages "
                  f"({', '.join(cfg.get('stages') or ())}); planned as if it ran",
                  file=sys.stderr)
        check_length_buckets(cfg)  # the prompt sizes, as train takes them (K3: (1024, 512))
        check_context(cfg, planned)  # a generation train would refuse
        # the planned stages' settings as train checks them (a negative batch was planned)
        stage_settings(cfg, [s for s in planned if s in cfg and cfg[s] is not None])
        check_emit(cfg, planned)  # (before: a ValueError traceback for emit.num_soft_tokens=-3)
        check_kernels_and_mesh(cfg)
        from emit_jax import parallel  # noqa: PLC0415

        check_batch_split(cfg, [s for s in planned if s in cfg and cfg[s] is not None],
                          dict(zip(parallel.MESH_AXES, mesh)), math.prod(mesh))
        if args.reference is not None and not {"grpo", "sft2"} & set(planned):
            raise PlanError(f"--reference {args.reference}: the reference model is stage 2's "
                            f"(grpo, sft2); this plan covers {', '.join(planned) or 'no stage'}")
        rep = make_report(cfg, args.config, mesh, args.device, args.headroom, stage=args.stage,
                          prompt_len=args.prompt_len, label_tokens=args.label_tokens,
                          images_per_sample=args.images_per_sample,
                          reference=args.reference or "shared")
    except (PlanError, ConfigError) as e:
        return cli.fail(PROG, e)
    info = rep["plan"].info
    if info["tiles_per_seq"] < info["tiles_per_seq_asked"]:  # (before: capped without a word)
        print(f"note: --images_per_sample {args.images_per_sample}: "
              f"{info['tiles_per_seq_asked']} image tiles of {info['tokens_per_tile']} tokens a "
              f"sequence do not fit its {info['prompt_len']:,}-token prompt; planned with "
              f"{info['tiles_per_seq']}", file=sys.stderr)
    text = to_json(rep) if args.json else format_report(rep)
    cli.finished(PROG)  # the plan is made: a signal as it prints says so
    print(text)
    return 0
