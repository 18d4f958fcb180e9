"""Lowering and compiling: the config's memory switches checked, each program traced and lowered
under them (one at a time: tracing changes the nodes' modes), then compiled by the TPU compiler
(``jobs`` at once); per program the compiler's figures, its refusal for lack of HBM, or where it
failed."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from emit_jax.aot.accounting import account, hbm_refusal
from emit_jax.aot.programs import Program
from emit_jax.errors import AotError


def _switches(cfg, section: str, options) -> dict:
    """``config.<section>`` as the trace-time ``options`` context takes it (as
    ``emit_jax.train`` passes it), checked; the resolved options as a dict."""
    given = dict(cfg.get(section) or {})
    try:
        with options(**given) as opts:
            return dataclasses.asdict(opts)
    except (TypeError, ValueError) as e:
        raise AotError(f"config {section} section {given}: {e}") from None


def memory_switches(cfg) -> dict:
    """``config.memory`` for ``models.memory.memory_options``, checked."""
    from emit_jax.models.memory import memory_options

    return _switches(cfg, "memory", memory_options)


def kernel_switches(cfg) -> dict:
    """``config.kernels`` for ``ops.kernels.kernel_options``, checked."""
    from emit_jax.ops.kernels import kernel_options

    return _switches(cfg, "kernels", kernel_options)


def lower_program(p: Program, memory: dict, kernels: dict | None = None) -> tuple:
    """``(lowered, abstract arguments, seconds)`` of ``p``: the nodes put in the program's mode
    (``p.prepare``), then traced and lowered under the config's memory and kernel switches."""
    from emit_jax.ops.kernels import kernel_options
    from emit_jax.models.memory import memory_options

    if p.prepare is not None:
        p.prepare()
    t0 = time.time()
    with memory_options(**memory), kernel_options(**(kernels or {})):
        lowered = p.fn.lower(*p.args)
    return lowered, p.fn.abstract_args(*p.args), time.time() - t0


def compile_program(p: Program, lowered, abstract_args, resident: dict,
                    shared: frozenset) -> dict:
    """Compile a lowered program; the compiler's figures, per device, in bytes (or its refusal
    for lack of HBM). Thread-safe: nothing here traces."""
    import jax

    t1 = time.time()
    out: dict = {"name": p.name}
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is a result, not a crash
        out["compile_s"] = round(time.time() - t1, 1)
        refusal = hbm_refusal(str(e))
        if refusal is None:
            raise
        out["refused"] = refusal
        # no executable: every argument counts as used (shardings as the call asks for them)
        acc = account(p, abstract_args, tuple(jax.tree.map(lambda a: a.sharding, t)
                                              for t in abstract_args[:2]), resident, shared)
        out.update(shared_args=acc["dup"], other_resident=acc["missing"], weights=acc["weights"])
        return out
    out["compile_s"] = round(time.time() - t1, 1)
    ma = compiled.memory_analysis()
    out.update(arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
               alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes),
               code=int(ma.generated_code_size_in_bytes))
    out["xla_peak"] = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    out["xla_total"] = (out["arguments"] + out["outputs"] - out["alias"] + out["temp"]
                        + out["code"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else (cost or {})
    out["flops"] = float(cost.get("flops", 0.0))
    out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    try:
        acc = account(p, abstract_args, compiled.input_shardings[0], resident, shared)
    except (ValueError, IndexError):
        # the executable has inputs JAX cannot map back (constants it hoisted into hidden
        # arguments, as splash attention's block masks): account by the requested shardings,
        # which cannot show the weights XLA dropped
        requested = tuple(jax.tree.map(lambda a: a.sharding, a) for a in abstract_args)
        acc = account(p, abstract_args, requested, resident, shared)
        out["input_shardings"] = "requested (the executable's could not be mapped)"
    out.update(shared_args=acc["dup"], other_resident=acc["missing"], weights=acc["weights"])
    outs = jax.tree.leaves(compiled.output_shardings[0])
    out["state_out"] = {"arrays": len(outs),
                        "sharded": sum(not s.is_fully_replicated for s in outs)}
    return out


def _failed(p: Program, e: BaseException) -> dict:
    """A program that does not trace or compile is a finding about that program: the others
    are still compiled and reported."""
    import traceback

    where = traceback.extract_tb(e.__traceback__)
    return {"name": p.name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}",
            "where": [f"{f.filename}:{f.lineno} {f.name}" for f in where
                      if "/emit_jax/" in f.filename][-6:],
            "peak": None, "fits": False, "plan": None, "ratio": None, "flag": False,
            "plan_phase": "", "shared_args": 0, "other_resident": 0}


def lower_and_compile(programs: Sequence[Program], memory: dict, resident: dict,
                      shared: frozenset, jobs: int = 1, kernels: dict | None = None) -> list[dict]:
    """:func:`lower_program` on each of ``programs`` in turn, then :func:`compile_program`,
    ``jobs`` at once; one result per program, in order (with ``lower_s``, or the failure)."""
    lowered: dict = {}
    for p in programs:  # tracing changes the nodes' modes: one program at a time
        try:
            lowered[p.name] = lower_program(p, memory, kernels)
        except Exception as e:  # noqa: BLE001
            lowered[p.name] = _failed(p, e)

    def finish(p) -> dict:
        got = lowered[p.name]
        if isinstance(got, dict):
            return got
        lo, abstract_args, seconds = got
        try:
            r = compile_program(p, lo, abstract_args, resident, shared)
        except Exception as e:  # noqa: BLE001
            return _failed(p, e)
        r["lower_s"] = round(seconds, 1)
        return r

    if jobs > 1:  # XLA compiles outside the GIL: the programs side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(finish, programs))
    return [finish(p) for p in programs]
