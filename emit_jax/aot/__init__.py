"""The TPU compiler's word on a config before any hardware is rented: the project's real jitted
programs compiled ahead of time for an abstract TPU slice, on this CPU host.

    python -m emit_jax.aot --config configs/internvl3_8b_grpo.py --topology v5p:2x2x1 \
        [--config.key=value ...] [--set key=value] [--mesh fsdp=4] [--stage sft|grpo|...] \
        [--programs a,b] [--prompt_len N] [--label_tokens 128] [--headroom 10] [--hbm GIB] \
        [--json] [--json_out PATH]

Needs libtpu (``pip install -e '.[tpu-aot]'``): ``jax.experimental.topologies`` then describes
a slice (``--topology``: generation and chips per dimension, e.g. ``v5e:2x2``, ``v5e:4x4``,
``v5p:2x2x1``, ``v6e:2x4``) as abstract devices, the config's mesh (``config.mesh`` or
``--mesh``) is laid over them (``emit_jax.parallel.make_mesh``), and every program of the stage
is lowered with the project's shardings (``emit_jax.parallel.sharded_jit.lower``) and compiled by
the TPU compiler. Nothing runs and nothing is allocated: the model, the LoRA policy (qwix's own,
traced) and the optimizer come from one ``nnx.eval_shape``, the batch is ``ShapeDtypeStruct``s.
The heat map's ``auto`` strategy is resolved as on a TPU (on this host it would pick the native
CPU kernel, which a TPU program cannot call). The default stage is the one ``emit_jax.plan``
reports (the largest of ``config.stages``).

Modules: ``tpu`` (libtpu, the slice, HBM per device), ``abstract`` (the stage's model, policy
and optimizer, abstract), ``batches`` (the step's shapes and batches), ``programs`` (the stage's
programs and their arguments), ``accounting`` (bytes per device, the compiler's refusals),
``compile`` (lowering, compiling), ``report`` (the report, as text or JSON), ``suggest`` (what
to change), ``command`` (the command line).
"""

from emit_jax.aot.abstract import Abstract, abstract_stage, model_setup
from emit_jax.aot.accounting import account, hbm_refusal
from emit_jax.aot.batches import Shapes, _sds, grpo_batch, sft_batch, split_layout, step_shapes
from emit_jax.aot.compile import (compile_program, kernel_switches, lower_and_compile,
                                  lower_program, memory_switches)
from emit_jax.aot.programs import PROGRAMS, Program, Stage, stage_programs
from emit_jax.aot.report import FLAG, default_stage, format_report, make_report, to_json
from emit_jax.aot.suggest import advice
from emit_jax.aot.tpu import (HBM_PER_CHIP, LIBTPU_MISSING, device_capacity, require_libtpu,
                              topology)
from emit_jax.errors import AotError

__all__ = [
    "FLAG", "HBM_PER_CHIP", "LIBTPU_MISSING", "PROGRAMS", "Abstract", "AotError", "Program",
    "Shapes", "Stage", "abstract_stage", "account", "advice", "compile_program", "default_stage",
    "device_capacity", "format_report", "grpo_batch", "hbm_refusal", "lower_and_compile",
    "lower_program", "make_report", "memory_switches", "kernel_switches", "model_setup",
    "require_libtpu",
    "sft_batch", "split_layout", "stage_programs", "step_shapes", "to_json", "topology",
    # used by tests/test_aot.py
    "_sds",
]
