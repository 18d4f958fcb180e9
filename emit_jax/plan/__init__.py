"""Per-device memory plan of a training config on a mesh, before any weight is loaded.

    python -m emit_jax.plan --config configs/internvl3_8b_grpo.py --mesh fsdp=8 \
        [--device a100-80g|h100-80g|h200|v5p|v4|cpu] [--headroom 10] [--json]

Prints, per device and for the whole model (unsharded), the bytes of every component of the
config's stage (default: the stage of ``config.stages`` with the largest footprint; ``--stage``
picks one), a total (resident + max(rollout, train)), and whether it fits the device with
``--headroom`` percent reserved; what to change when it does not. Nothing is allocated: the
variables come from ``nnx.eval_shape``, their shardings from their logical axes on an abstract
mesh, the optimizer state from ``jax.eval_shape``, activations and the KV cache from formulas.
What each component counts, the formulas, their symbols and their checks against XLA:
docs/MEMORY_PLAN.md.

Modules: ``devices`` (memory per device), ``mesh`` (meshes, sharded bytes), ``variables``
(abstract variables, LoRA / QLoRA arrays), ``stage`` (a stage's step: :class:`Setup`),
``activations`` (the activation formulas), ``core`` (:func:`plan_stage`, the optimizer's
bytes), ``advice`` (what-ifs), ``report`` (the report, as text or JSON), ``command`` (the
command line).
"""

from emit_jax.errors import PlanError
from emit_jax.plan.activations import activation_terms
from emit_jax.plan.advice import suggestions
from emit_jax.plan.core import Row, StagePlan, optimizer_bytes, plan_stage
from emit_jax.plan.devices import DEVICES, GiB, cpu_ram_bytes, device_capacity
from emit_jax.plan.mesh import abstract_mesh, array_bytes, resolve_mesh, shards
from emit_jax.plan.report import format_report, make_report, to_json
from emit_jax.plan.stage import Setup, _tiles, stage_setup
from emit_jax.plan.variables import (QBITS, TRAIN_BITS, Var, _in_full, _master, abstract_variables,
                                     lora_factors, model_config, qlora_arrays)

__all__ = [
    "DEVICES", "GiB", "PlanError", "QBITS", "Row", "Setup", "StagePlan", "TRAIN_BITS", "Var",
    "abstract_mesh", "abstract_variables", "activation_terms", "array_bytes", "cpu_ram_bytes",
    "device_capacity", "format_report", "lora_factors", "make_report", "model_config",
    "optimizer_bytes", "plan_stage", "qlora_arrays", "resolve_mesh", "shards", "stage_setup",
    "suggestions", "to_json",
    # used by tests/test_plan.py and emit_jax.aot
    "_in_full", "_master", "_tiles",
]
