"""Device meshes, logical-axis sharding rules, sharded jitted steps and multihost start-up.

One device, eight simulated CPU devices, a GPU node or a TPU pod slice run the same code: the
learner builds a :class:`jax.sharding.Mesh` with the axes ``data``, ``fsdp`` and ``tensor`` from
the config, every parameter's logical axis names (``emit_jax.models.layers``; LoRA factors and
optimizer moments inherit them) are mapped to mesh axes by :data:`DEFAULT_RULES`, and the train
step, the sampler and the reference log-probs are jitted with explicit input and output
shardings (:class:`sharded_jit`). Activations get sharding constraints at block boundaries
(:func:`constrain`, a no-op outside :func:`use_mesh`). Batches are split over ``data`` x
``fsdp`` along their first axis; in a multi-process run (:func:`initialize`) each process loads
the rows its devices hold (:func:`process_rows`) and :func:`assemble_batch` makes the global
arrays.

The package is the bottom layer the models and the learner build on; it imports nothing else
from ``emit_jax``. Its modules, each importing only those above it:

- :mod:`emit_jax.parallel.mesh`: mesh specs and meshes, the logical-axis rules, array and batch
  shardings, activation constraints (:func:`use_mesh`, :func:`constrain`);
- :mod:`emit_jax.parallel.batch`: global batches from host data, per process
  (:func:`global_batch`, :func:`process_rows`, :func:`assemble_batch`);
- :mod:`emit_jax.parallel.jit`: placing modules on a mesh (:func:`shard_module`) and
  :class:`sharded_jit`;
- :mod:`emit_jax.parallel.distributed`: multihost start-up (:func:`initialize`) and the
  collectives around it (:func:`barrier`, :func:`replicate_module`, :func:`localize_module`,
  :func:`to_host`); independent of the others.

Every name is re-exported here: ``from emit_jax.parallel import sharded_jit``.
"""

from emit_jax.parallel.mesh import (
    _ACTIVE, _var_axes, BATCH_AXES, DEFAULT_RULES, MESH_AXES, active_mesh, batch_sharding,
    batch_spec,
    constrain, constrain_hidden, logical_to_spec, make_mesh, mesh_shape, parse_mesh,
    SAMPLER_MESHES, sampler_mesh, state_shardings, use_mesh)
from emit_jax.parallel.batch import assemble_batch, global_batch, process_rows
from emit_jax.parallel.jit import placed_module, shard_module, sharded_jit
from emit_jax.parallel.distributed import (
    DistributedArgs, any_process, barrier, distributed_args_from_env, initialize, is_primary,
    localize_module, replicate_module, to_host)

__all__ = ["MESH_AXES", "BATCH_AXES", "DEFAULT_RULES", "parse_mesh", "mesh_shape", "make_mesh",
           "SAMPLER_MESHES", "sampler_mesh", "placed_module",
           "logical_to_spec", "state_shardings", "batch_spec", "batch_sharding", "shard_module",
           "use_mesh", "active_mesh", "constrain", "constrain_hidden", "sharded_jit",
           "global_batch", "process_rows", "assemble_batch", "initialize",
           "DistributedArgs", "distributed_args_from_env", "to_host",
           "is_primary", "any_process", "barrier", "replicate_module", "localize_module"]
