"""Device meshes, logical-axis sharding rules, sharded jitted steps and multihost start-up.

One device, eight simulated CPU devices, a GPU node or a TPU pod slice run the same code: the
learner builds a :class:`jax.sharding.Mesh` with the axes ``data``, ``fsdp`` and ``tensor`` from
the config, every parameter's logical axis names (``emit_jax.models.layers``; LoRA factors and
optimizer moments inherit them) are mapped to mesh axes by :data:`DEFAULT_RULES`, and the train
step, the sampler and the reference log-probs are jitted with explicit input and output
shardings (:func:`sharded_jit`). Activations get sharding constraints at block boundaries
(:func:`constrain`, a no-op outside :func:`use_mesh`). Batches are split over ``data`` x
``fsdp`` along their first axis.

A mesh axis that does not divide a dimension is dropped for that dimension (the dimension is
replicated over it) rather than failing: the tiny model's 2 key/value heads or InternVL3's
151,674-entry vocabulary stay valid on any mesh. :func:`describe` lists what was replicated.

Multihost: :func:`initialize` starts ``jax.distributed`` from explicit arguments, from SLURM's
variables, or lets JAX detect a TPU pod; afterwards ``jax.devices()`` is global and every process
runs the same program on its share of the batch: a process loads only the rows its devices
hold (:func:`process_rows`) and :func:`assemble_batch` makes the global arrays, or, where the
batch is not split by process, every process passes the same full batch (:func:`global_batch`).

Mesh spec strings: ``"fsdp=8"``, ``"data=2,fsdp=2,tensor=2"``, ``"data=-1"``; ``-1`` means the
devices the other axes leave (at most one axis may say so; axes not named are 1, except that
with no ``-1`` anywhere and fewer devices named than present, ``fsdp`` takes the rest).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of axes, or None = replicated). FSDP shards the model
# width (the parameters' "embed" side), tensor parallelism the heads / MLP / vocabulary side.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"), ("vit_embed", "fsdp"), ("mm_in", "fsdp"),
    ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
    ("vit_heads", "tensor"), ("vit_mlp", "tensor"), ("mm_hidden", "tensor"),
    ("norm", None), ("vit_pos", None), ("conv_h", None), ("conv_w", None), ("conv_in", None),
    # activations at block boundaries: [batch, sequence, width]
    ("act_seq", None), ("act_embed", None),
)


# ------------------------------------------------------------------------------------ mesh
def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` (or a mapping) -> ``{"data": 2, "fsdp": -1, "tensor": 1}``."""
    if spec is None or spec == "":
        return {"data": 1, "fsdp": -1, "tensor": 1}
    if isinstance(spec, str):
        items = {}
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not axis=size "
                                 f"(axes: {', '.join(MESH_AXES)})")
            k, v = part.split("=", 1)
            try:
                items[k] = int(v)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size of {k!r} is not an integer") from None
        spec = items
    spec = dict(spec)
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh spec names unknown axes {sorted(unknown)}; axes: {MESH_AXES}")
    out = {a: int(spec.get(a, 1)) for a in MESH_AXES}
    if not any(v == -1 for v in out.values()) and "fsdp" not in spec:
        out["fsdp"] = -1
    for a, v in out.items():
        if v == 0 or v < -1:
            raise ValueError(f"mesh axis {a}={v}: sizes are positive, or -1 for the rest")
    if sum(v == -1 for v in out.values()) > 1:
        raise ValueError(f"mesh spec {spec}: at most one axis may be -1")
    return out


def mesh_shape(spec, num_devices: int) -> tuple[int, int, int]:
    """Resolve ``-1`` against ``num_devices``; the product must equal it."""
    axes = parse_mesh(spec)
    known = math.prod(v for v in axes.values() if v != -1)
    if any(v == -1 for v in axes.values()):
        if num_devices % known:
            raise ValueError(f"mesh {axes}: the fixed axes ({known} devices) do not divide the "
                             f"{num_devices} devices")
        axes = {a: (num_devices // known if v == -1 else v) for a, v in axes.items()}
    total = math.prod(axes.values())
    if total != num_devices:
        raise ValueError(f"mesh {axes} needs {total} devices, but {num_devices} are present "
                         f"(use -1 for one axis to take the rest)")
    return tuple(axes[a] for a in MESH_AXES)


def make_mesh(spec=None, devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` with axes ``(data, fsdp, tensor)`` over ``devices`` (default: all, global in a
    multi-process run). ``tensor`` is the fastest-varying axis, so it stays inside a host."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - unusual topologies: plain order
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


# ------------------------------------------------------------------------------------ rules
def _rule_map(rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, target in (DEFAULT_RULES if rules is None else rules):
        if target is None:
            out[name] = ()
        elif isinstance(target, str):
            out[name] = (target,)
        else:
            out[name] = tuple(target)
    return out


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules=None) -> P:
    """The ``PartitionSpec`` for an array of ``shape`` whose dimensions have logical ``axes``.

    Mesh axes of size 1, already used by an earlier dimension, or not dividing the dimension
    are dropped (that dimension is replicated over them)."""
    if not axes or len(axes) != len(shape):
        return P()
    rmap = _rule_map(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        chosen = []
        for m in rmap.get(name, ()) if name is not None else ():
            size = mesh.shape[m]
            if size == 1 or m in used:
                continue
            if dim % (math.prod(mesh.shape[c] for c in chosen) * size):
                continue
            chosen.append(m)
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _var_axes(v: nnx.Variable):
    meta = v.get_metadata()
    axes = meta.get("out_sharding", meta.get("sharding_names", meta.get("sharding")))
    return axes if isinstance(axes, (tuple, list)) else None


def state_shardings(state, mesh: Mesh, rules=None):
    """A pytree like ``state`` (an ``nnx.State``) holding one ``NamedSharding`` per array,
    from each Variable's logical axis names (none: replicated)."""
    def one(v):
        if _is_var(v):
            val = v.get_value()
            shape = getattr(val, "shape", ())
            return v.replace(NamedSharding(mesh, logical_to_spec(_var_axes(v), shape, mesh, rules)))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, state, is_leaf=_is_var)


def batch_spec(shape: Sequence[int], mesh: Mesh) -> P:
    """First axis over ``data`` x ``fsdp`` where it divides (else over what does), rest
    replicated; scalars replicated."""
    if not len(shape):
        return P()
    return logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh)


def batch_sharding(x, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(np.shape(x), mesh))


def shard_module(node, mesh: Mesh, rules=None):
    """Place every array of ``node`` (a Module, an Optimizer, or a tuple of them) by its
    logical axes; in place. Returns ``node``."""
    state = nnx.state(node)
    sh = state_shardings(state, mesh, rules)
    nnx.update(node, _place_tree(state, sh))
    return node


def _place_tree(tree, shardings):
    """:func:`_place` over a tree; an array that several Variables hold (a LoRA policy and its
    reference share their base weights) is placed once and stays shared."""
    placed: dict = {}

    def one(a, s):
        key = (id(a), s)
        if key not in placed:
            placed[key] = (a, _place(a, s))  # keep ``a`` alive so its id is not reused
        return placed[key][1]
    return jax.tree.map(one, tree, shardings)


def _place(a, s: NamedSharding):
    """``a`` on sharding ``s``: unchanged when already there; a process-local array (every
    process holding the same full value) becomes a global one; a global array is resharded."""
    if _placed(a, s):
        return a
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return jax.device_put(a, s)
    return global_batch(a, s)




# ----------------------------------------------------------------------------- activations
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("emit_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules=None):
    """Within this context, :func:`constrain` places activations on ``mesh`` by ``rules``."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)




def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` by logical ``axes`` under :func:`use_mesh`;
    unchanged otherwise (single-device code paths pay nothing)."""
    cur = _ACTIVE.get()
    if cur is None:
        return x
    mesh, rules = cur
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(tuple(axes), x.shape, mesh, rules)))


def constrain_hidden(x: jax.Array) -> jax.Array:
    """``[B, T, D]`` activations between blocks: batch over data x fsdp, the rest replicated."""
    return constrain(x, ("batch", "act_seq", "act_embed"))


# ------------------------------------------------------------------------------ sharded jit
def _is_node(x) -> bool:
    return isinstance(x, (nnx.Module, nnx.Optimizer)) or (
        hasattr(nnx, "Pytree") and isinstance(x, nnx.Pytree) and not isinstance(x, nnx.Variable))


def global_batch(x, sharding: NamedSharding):
    """A global ``jax.Array`` of host data: in one process a ``device_put``; with several
    processes each passes the same full array and keeps the pieces its devices hold."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = global_batch(jax.random.key_data(x), sharding)  # typed PRNG keys: via their data
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


# --------------------------------------------------------------------- per-process batches
def process_rows(n: int, mesh: Mesh) -> tuple[int, int] | None:
    """The rows ``[start, stop)`` of an ``n``-row batch that this process's devices hold under
    :func:`batch_spec`, when every process holds its own contiguous ``n / process_count`` rows
    (then each process can load just those); None when the batch is not split that way (one
    process, or a batch axis replicated across processes, e.g. a tensor axis spanning hosts)."""
    if jax.process_count() == 1:
        return None
    sharding = NamedSharding(mesh, batch_spec((n,), mesh))
    rows: set[int] = set()
    for idx in sharding.addressable_devices_indices_map((n,)).values():
        rows.update(range(*idx[0].indices(n)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start or len(rows) * jax.process_count() != n:
        return None
    return start, stop


def _pad_axis(x: np.ndarray, size: int, axis: int, value, left: bool = False) -> np.ndarray:
    extra = size - x.shape[axis]
    if extra <= 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (extra, 0) if left else (0, extra)
    return np.pad(x, widths, constant_values=value)


def assemble_batch(local: Mapping[str, Any], mesh: Mesh, *, pad_id: int = 0,
                   ignore: int = -100, pad_side: str = "right") -> dict[str, jax.Array]:
    """Global arrays from every process's own collated rows (a collective: call it on every
    process with its batch from ``emit_jax.data.pipeline.collate``, plus ``label_positions``).

    Shapes are agreed first (one small all-gather): token arrays ``[b, L]`` are padded to the
    longest ``L`` of any process (on ``pad_side``; label positions shift with left padding), the
    label arrays to the largest ``K``, and the tile stack ``pixel_values [N, ...]`` and the CE
    stack ``ce_pixels [M, ...]`` to the largest count, a multiple of the process's batch shards.
    Each process's block keeps its padding after its real rows, so the global stacks have padding
    between real rows: ``tile_valid [P*N]`` and ``num_ce`` (now a bool mask ``[P*M]``) mark them,
    and the model takes the real rows in order (``emit_jax.models.internvl.valid_first``).
    """
    from jax.experimental import multihost_utils

    nproc = jax.process_count()
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES) // nproc  # batch shards per process
    ids = np.asarray(local["input_ids"])
    n_tiles, n_ce = int(local.get("num_tiles", 0)), int(local.get("num_ce", 0))
    sizes = np.array([ids.shape[1], np.shape(local.get("label_pos", np.zeros((0, 0))))[1],
                      len(local.get("pixel_values", ())), len(local.get("ce_pixels", ())),
                      n_tiles], np.int64)
    seq, k, tiles, ces, any_tiles = np.asarray(
        multihost_utils.process_allgather(sizes)).reshape(nproc, -1).max(0)
    round_up = lambda v: max(shards, -(-int(v) // shards) * shards)  # noqa: E731
    left = pad_side == "left"
    host: dict[str, np.ndarray] = {
        "input_ids": _pad_axis(ids, seq, 1, pad_id, left),
        "attention_mask": _pad_axis(np.asarray(local["attention_mask"]), seq, 1, 0, left)}
    if "labels" in local:
        host["labels"] = _pad_axis(np.asarray(local["labels"]), seq, 1, ignore, left)
    if "label_pos" in local:
        pos = np.asarray(local["label_pos"]) + (seq - ids.shape[1] if left else 0)
        host["label_pos"] = _pad_axis(pos, k, 1, 0)
        host["label_ids"] = _pad_axis(np.asarray(local["label_ids"]), k, 1, 0)
        host["label_mask"] = _pad_axis(np.asarray(local["label_mask"]), k, 1, False)
    if any_tiles:
        host["pixel_values"] = _pad_axis(np.asarray(local["pixel_values"]), round_up(tiles), 0, 0)
        host["tile_valid"] = np.arange(round_up(tiles)) < n_tiles
    if "ce_pixels" in local:
        host["ce_pixels"] = _pad_axis(np.asarray(local["ce_pixels"]), round_up(ces), 0, 0)
        host["num_ce"] = np.arange(round_up(ces)) < n_ce
    out = {}
    for key, x in host.items():
        shape = (nproc * x.shape[0],) + x.shape[1:]
        out[key] = jax.make_array_from_process_local_data(
            NamedSharding(mesh, batch_spec(shape, mesh)), x, shape)
    return out


class sharded_jit:  # noqa: N801 - used like a decorator / function
    """``fn(*args)`` jitted over a mesh with explicit shardings.

    Graph-node arguments (Modules, Optimizers) are split into their state with the shardings of
    :func:`state_shardings`. The ``mutable`` part (an nnx filter; default everything) comes back
    out with the same shardings and is written into the nodes afterwards (so ``fn`` may update
    it, as an optimizer step does); the rest is input only, so frozen weights are neither copied
    nor returned (a LoRA policy and its reference keep sharing theirs). Array arguments are
    split along their first axis over ``data`` x ``fsdp`` (:func:`batch_spec`); other Python
    values are static. Outputs are replicated. Without a mesh this is ``nnx.jit``.
    :meth:`lower` gives the same program lowered on abstract inputs, without running it
    (``python -m emit_jax.aot`` compiles it for a TPU slice on a CPU host).
    """

    def __init__(self, fn: Callable, mesh: Mesh | None = None, rules=None, *, mutable=...):
        self.fn, self.mesh, self.rules = fn, mesh, rules
        self.mutable = mutable
        self._cache: dict = {}
        self._plain = nnx.jit(fn) if mesh is None else None

    def __call__(self, *args):
        if self.mesh is None:
            return self._plain(*args)
        jitted, nodes, (state, frozen), dyn, (st_sh, fr_sh, dyn_sh) = self._program(args)
        with use_mesh(self.mesh, self.rules):
            placed = _place_tree((state, frozen), (st_sh, fr_sh))
            dyn = tuple(jax.tree.map(_place, d, s) for d, s in zip(dyn, dyn_sh))
            new_state, out = jitted(*placed, *dyn)
        nnx.update(nodes, placed[1], new_state)  # frozen: placed once, then reused as is
        return out

    def lower(self, *args) -> "jax.stages.Lowered":
        """The program ``self(*args)`` would run, lowered and not run: ``jax.jit(pure,
        in_shardings, out_shardings).lower(...)`` of exactly the function and shardings
        :meth:`__call__` uses, on abstract inputs (:meth:`abstract_args`). Nothing is placed or
        executed, so the mesh may be laid over abstract devices (``jax.experimental.
        topologies``: a TPU slice compiled on a CPU host) and the nodes may be abstract
        (``nnx.eval_shape``). ``.compile()`` of the result gives ``memory_analysis()``,
        ``cost_analysis()`` and ``input_shardings``. Traced under :func:`use_mesh`, so the
        activation constraints are those of a real call."""
        if self.mesh is None:
            raise ValueError("sharded_jit.lower needs a mesh (without one it is nnx.jit)")
        jitted = self._program(args)[0]
        with use_mesh(self.mesh, self.rules):
            return jitted.lower(*self.abstract_args(*args))

    def abstract_args(self, *args) -> tuple:
        """The arguments of the program ``self(*args)`` runs, as ``jax.ShapeDtypeStruct`` on
        their shardings: ``(mutable state, frozen state, *arrays)``. The two states are
        ``nnx.State`` trees of ``nnx.split`` of the graph-node arguments taken together (paths
        start with the node's index among them); the arrays are the array arguments in order
        (which may be ``ShapeDtypeStruct`` already; the batch is split over data x fsdp).
        Leaves come in the order of the lowered program's ``args_info``."""
        _, _, (state, frozen), dyn, (st_sh, fr_sh, dyn_sh) = self._program(args)
        return (jax.tree.map(_abstract, state, st_sh), jax.tree.map(_abstract, frozen, fr_sh),
                *(jax.tree.map(_abstract, d, s) for d, s in zip(dyn, dyn_sh)))

    def _program(self, args):
        """``(jitted, nodes, (state, frozen), arrays, (state, frozen, array shardings))`` for a
        call on ``args``; the jitted function is cached by the arguments' structure."""
        node_idx = [i for i, a in enumerate(args) if _is_node(a)]
        nodes = tuple(args[i] for i in node_idx)
        graphdef, state, frozen = nnx.split(nodes, self.mutable, ...)
        dyn_idx = [i for i, a in enumerate(args) if i not in node_idx and _is_arraylike(a)]
        static = tuple((i, args[i]) for i in range(len(args)) if i not in node_idx and i not in dyn_idx)
        dyn = tuple(args[i] for i in dyn_idx)
        st_sh = state_shardings(state, self.mesh, self.rules)
        fr_sh = state_shardings(frozen, self.mesh, self.rules)
        dyn_sh = tuple(jax.tree.map(lambda a: batch_sharding(a, self.mesh), d) for d in dyn)
        ckey = (graphdef, tuple(node_idx), tuple(dyn_idx), _static_key(static),
                tuple(jax.tree.structure(d) for d in dyn), jax.tree.structure(st_sh),
                jax.tree.structure(fr_sh),
                tuple(jax.tree.leaves(jax.tree.map(lambda s: s.spec, dyn_sh))))
        jitted = self._cache.get(ckey)
        if jitted is None:
            n, fn, mutable = len(args), self.fn, self.mutable

            def pure(state, frozen, *dyn_vals):
                ns = nnx.merge(graphdef, state, frozen)
                full: list = [None] * n
                for i, node in zip(node_idx, ns):
                    full[i] = node
                for i, v in zip(dyn_idx, dyn_vals):
                    full[i] = v
                for i, v in static:
                    full[i] = v
                out = fn(*full)
                return nnx.state(ns, mutable), out

            jitted = jax.jit(pure, in_shardings=(st_sh, fr_sh, *dyn_sh),
                             out_shardings=(st_sh, NamedSharding(self.mesh, P())))
            self._cache[ckey] = jitted
        return jitted, nodes, (state, frozen), dyn, (st_sh, fr_sh, dyn_sh)


def _abstract(x, sharding) -> jax.ShapeDtypeStruct:
    """``x`` (an array or a ``ShapeDtypeStruct``) as a ``ShapeDtypeStruct`` on ``sharding``."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _placed(a, s) -> bool:
    return isinstance(a, jax.Array) and a.sharding == s


# what a sharded_jit takes as an array argument (ShapeDtypeStruct: sharded_jit.lower)
_ARRAYLIKE = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def _is_arraylike(a) -> bool:
    leaves = jax.tree.leaves(a)
    return bool(leaves) and all(isinstance(x, _ARRAYLIKE) for x in leaves)


def _static_key(static):
    out = []
    for i, v in static:
        try:
            hash(v)
            out.append((i, v))
        except TypeError:
            out.append((i, id(v)))
    return tuple(out)


# ------------------------------------------------------------------------------- multihost
@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1


def distributed_args_from_env(env: Mapping[str, str] | None = None) -> DistributedArgs | None:
    """Explicit ``EMIT_COORDINATOR`` / ``EMIT_NUM_PROCESSES`` / ``EMIT_PROCESS_ID``, else SLURM's
    ``SLURM_NTASKS`` / ``SLURM_PROCID`` with the first node of ``SLURM_JOB_NODELIST`` (or
    ``MASTER_ADDR``) on port ``EMIT_COORDINATOR_PORT`` (default 12355); None when neither says
    there is more than one process."""
    env = os.environ if env is None else env
    if env.get("EMIT_COORDINATOR"):
        return DistributedArgs(env["EMIT_COORDINATOR"], int(env.get("EMIT_NUM_PROCESSES", "1")),
                               int(env.get("EMIT_PROCESS_ID", "0")))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        host = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        if not host:
            raise ValueError("SLURM run with several tasks but neither MASTER_ADDR nor "
                             "SLURM_JOB_NODELIST names the coordinator host")
        port = env.get("EMIT_COORDINATOR_PORT", "12355")
        return DistributedArgs(f"{host}:{port}", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
    return None


def _first_slurm_host(nodelist: str) -> str:
    """``"gpu[012-015,020],cpu1"`` -> ``"gpu012"``."""
    nodelist = nodelist.strip()
    if not nodelist:
        return ""
    depth, first = 0, ""
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            break
        first += ch
    if "[" not in first:
        return first
    prefix, rest = first.split("[", 1)
    head = rest.rstrip("]").split(",")[0].split("-")[0]
    return prefix + head


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1, *,
               env: Mapping[str, str] | None = None, tpu: bool | None = None) -> bool:
    """Start ``jax.distributed`` once: from the explicit arguments, else from the environment
    (:func:`distributed_args_from_env`), else on a TPU pod with JAX's own detection. Returns
    True when the run has more than one process. On CPU, collectives go through gloo."""
    args = DistributedArgs(coordinator, num_processes, process_id) if coordinator \
        else distributed_args_from_env(env)
    if args is None:
        on_tpu = tpu if tpu is not None else bool((env or os.environ).get("TPU_WORKER_HOSTNAMES")
                                                   or (env or os.environ).get("TPU_NAME"))
        if not on_tpu:
            return False
        jax.distributed.initialize()
        return jax.process_count() > 1
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"bad multihost arguments: process {args.process_id} of "
                         f"{args.num_processes} (coordinator {args.coordinator!r})")
    if args.num_processes == 1:
        return False
    # CPU devices talk through gloo (harmless elsewhere; asking for the backend here would
    # start it before jax.distributed, which JAX forbids)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    return True


def is_primary() -> bool:
    """True on process 0, the one that writes logs, metrics, plots and exports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def replicate_module(node, mesh: Mesh | None):
    """Give every process a full copy of ``node``'s arrays (a collective: call it on every
    process), so process 0 can export them; in place. A no-op without a mesh or with one
    process (a single process can read its sharded arrays)."""
    if mesh is None or jax.process_count() == 1:
        return node
    state = nnx.state(node)
    rep = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    nnx.update(node, jax.jit(lambda s: s, out_shardings=rep)(state))
    return node


def localize_module(node):
    """Turn every multi-process array of ``node`` into a full copy on this process's first
    device (a collective: call it on every process); in place. Eager code that is not one jitted
    program (qwix tracing the model to add LoRA factors) then runs per process, after which the
    caller shards the module again. A no-op with one process."""
    if jax.process_count() == 1:
        return node
    state = nnx.state(node)
    dev = jax.local_devices()[0]
    nnx.update(node, jax.tree.map(
        lambda a: jax.device_put(to_host(a), dev) if isinstance(a, jax.Array)
        and not a.is_fully_addressable else a, state))
    return node




def to_host(x) -> np.ndarray:
    """A NumPy copy of a (possibly multi-process, replicated or sharded) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


__all__ = ["MESH_AXES", "DEFAULT_RULES", "parse_mesh", "mesh_shape", "make_mesh",
           "logical_to_spec", "state_shardings", "batch_spec", "batch_sharding", "shard_module",
           "use_mesh", "constrain", "constrain_hidden", "sharded_jit",
           "global_batch", "process_rows", "assemble_batch", "initialize",
           "distributed_args_from_env", "to_host",
           "is_primary", "barrier", "replicate_module", "localize_module"]
