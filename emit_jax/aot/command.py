"""``python -m emit_jax.aot``: the command line.

Errors a user can cause (no libtpu, unknown topology, bad config or override, a mesh that does
not match the topology) print one line ``emit_jax.aot: error: ...`` and exit 2. A program that
fails to trace or compile (other than for HBM) is reported as failed, with where, after the
others, and the exit status is 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from emit_jax import cli, configs
from emit_jax.aot.programs import check_program_names
from emit_jax.aot.report import format_report, make_report, to_json
from emit_jax.aot.tpu import require_libtpu
from emit_jax.errors import AotError, ConfigError, InputOverwriteError, PlanError, show_path
from emit_jax.fileio import atomic_output, check_not_input, check_writable

PROG = "emit_jax.aot"
DESCRIPTION = ("The TPU compiler's word on a config before any hardware is rented: the project's "
               "real jitted programs compiled ahead of time for an abstract TPU slice, on this "
               "CPU host.")


def _parser() -> cli.Parser:
    p = cli.Parser(prog="python -m emit_jax.aot", description=DESCRIPTION, error_type=AotError)
    p.add_argument("--config", required=True, help="ml_collections config file (path[:arg])")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:2x2, v5p:2x2x1, v6e:2x4")
    p.add_argument("--mesh", default=None, help='default: config.mesh; e.g. "fsdp=4"')
    p.add_argument("--stage", default=None,
                   help="compile this stage (default: the largest of config.stages, as plan)")
    p.add_argument("--programs", default=None, type=cli.nonempty,
                   help="only these, comma-separated (sft: train_step; grpo: sampler, score, "
                   "train_step)")
    p.add_argument("--prompt_len", type=cli.int_in(1, cli.MAX_TOKENS), default=None,
                   help="prompt tokens (default: the largest data.length_buckets)")
    p.add_argument("--label_tokens", type=cli.int_in(1, cli.MAX_TOKENS), default=128,
                   help="SFT label positions per row")
    p.add_argument("--headroom", type=cli.percent, default=10.0, help="percent of HBM reserved")
    p.add_argument("--hbm", type=cli.positive_float, default=None,
                   help="GiB per device (default: by chip)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. grpo.G=4 (repeatable); also --config.KEY=VALUE")
    p.add_argument("--jobs", type=cli.positive_int, default=1,
                   help="programs compiled at once (8B: 5-8 GB of host RAM each)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--json_out", default=None, metavar="PATH",
                   help="also write the JSON object to PATH (the text goes to stdout)")
    return p


def _check_replaceable(path: str) -> None:
    """An existing ``--json_out`` is replaced only when it is an earlier aot report (a JSON
    object with ``programs``), said in a note; any other file is refused (sixteenth probe D3:
    an evaluate result given as ``--json_out`` was replaced without a word)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and "programs" in old):
        raise ConfigError(f"--json_out {show_path(path)}: exists and is not an aot report; aot "
                          "replaces only its own report: choose another path, or move the file "
                          "away")
    print(f"note: --json_out {show_path(path)} exists; it is replaced when the programs are "
          "compiled", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = configs.split_overrides(argv)
        args = _parser().parse_args(rest)
        if args.json_out == "":  # (seventeenth probe AO3: no report, no word, exit 0)
            raise ConfigError("--json_out: empty path (an unset shell variable?); name the file "
                              "to write")
        if args.json_out:  # before the programs compile (minutes), as it is written after
            seps = tuple(x for x in (os.sep, os.altsep) if x)
            if args.json_out.endswith(seps) or os.path.isdir(args.json_out):
                # (eighteenth probe A7: "DIR/" wrote the file DIR, without the slash)
                raise ConfigError(f"--json_out {args.json_out}: names a folder; aot writes one "
                                  f"JSON file (e.g. {os.path.join(args.json_out, 'aot.json')})")
            try:
                check_writable(args.json_out)
            except OSError as e:
                raise ConfigError(f"--json_out {args.json_out}: {e.strerror or e}") from None
            # before: --json_out onto the --config file replaced the config with the report
            check_not_input(args.json_out, {"--config": configs.resolve(args.config)[0]})
            _check_replaceable(args.json_out)
        cfg = configs.load(args.config, overrides + list(args.set))
        from emit_jax.training.validate import check_stages  # noqa: PLC0415

        # the config's stages as train takes them (before: ('base', 'base') was compiled)
        wanted = [args.stage] if args.stage else list(check_stages(cfg))
        from emit_jax.training.config import STAGES  # noqa: PLC0415

        for key in ["arch"] + [s for s in wanted if s in STAGES]:  # others: "unknown stage"
            if key not in cfg:  # before: an AttributeError traceback from the model builder
                what = "model" if key == "arch" else f"{key} stage"
                raise ConfigError(f"config {key}: missing (the {what} to compile needs it)")
        from emit_jax.training.validate import check_context, check_length_buckets  # noqa

        check_length_buckets(cfg)  # the prompt sizes, as train takes them
        check_context(cfg, wanted)  # a generation train would refuse, before minutes of compiling
        require_libtpu()
        import jax  # noqa: PLC0415

        # programs for abstract TPU devices: a persistent cache (JAX_COMPILATION_CACHE_DIR) can
        # neither keep nor load them, and JAX warned so in two raw lines (seventeenth probe AO3b)
        jax.config.update("jax_enable_compilation_cache", False)
        only = tuple(x for x in (args.programs or "").replace(" ", "").split(",") if x)
        # before the topology and the model (seconds): the programs the config's stages have
        check_program_names(only, wanted)
        with cli.stop_promptly(PROG):  # compilations of minutes; nothing written yet
            rep = make_report(cfg, args.config, args.topology, mesh_spec=args.mesh,
                              stage=args.stage, prompt_len=args.prompt_len,
                              label_tokens=args.label_tokens, headroom=args.headroom,
                              hbm_gib=args.hbm, only=only, jobs=args.jobs)
    except (AotError, PlanError, ConfigError, InputOverwriteError) as e:
        return cli.fail(PROG, e)
    text = to_json(rep)
    if args.json_out:
        try:
            with atomic_output(args.json_out, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            print(f"{PROG}: error: --json_out {args.json_out}: {e.strerror or e}", file=sys.stderr)
            return 2
    status = 1 if any(r.get("error") for r in rep["programs"]) else 0
    text = text if args.json else format_report(rep)
    if status == 0:
        cli.finished(PROG)  # compiled and written: a signal as it prints says so
    print(text)
    return status
