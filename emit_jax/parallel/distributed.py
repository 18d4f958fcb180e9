"""Multihost start-up and the few collectives the commands need around it.

:func:`initialize` starts ``jax.distributed`` from explicit arguments, from the environment
(``EMIT_COORDINATOR`` / ``EMIT_NUM_PROCESSES`` / ``EMIT_PROCESS_ID``, or SLURM's variables:
:func:`distributed_args_from_env`), or lets JAX detect a TPU pod; afterwards ``jax.devices()`` is
global and every process runs the same program. Process 0 writes logs and exports
(:func:`is_primary`); :func:`barrier` waits for every process; :func:`replicate_module`,
:func:`localize_module` and :func:`to_host` turn multi-process arrays into full copies (each is a
collective, a no-op with one process).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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
        _without_preemption_service()
        jax.distributed.initialize()
        return _started(jax.process_count() > 1)
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"bad multihost arguments: process {args.process_id} of "
                         f"{args.num_processes} (coordinator {args.coordinator!r})")
    if args.num_processes == 1:
        return False
    # CPU devices talk through gloo (harmless elsewhere; asking for the backend here would
    # start it before jax.distributed, which JAX forbids)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _without_preemption_service()
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    return _started(True)


def _without_preemption_service() -> None:
    """jax's preemption service (on by default) installs its own C++ SIGTERM handler when
    ``jax.distributed`` starts, in place of this process's: a SIGTERM outside the training
    loop (which installs its handlers again) was then taken by it and ignored; the process ran
    on to the end (twenty-sixth probe MC1/MC2). The training loop's agreed stop
    (``training.loop``) is this tool's preemption handling, and Orbax reads the service's
    absence as no preemption."""
    jax.config.update("jax_enable_preemption_service", False)


#: True once :func:`initialize` started ``jax.distributed`` with more than one process
_STARTED = False


def _started(several: bool) -> bool:
    global _STARTED
    _STARTED = several
    return several


#: True once a collective of this process failed because another process of the run was gone
_PEER_LOST = False


def note_peer_lost() -> None:
    """A collective failed because another process of the run ended: :func:`leave` then ends
    this one at once."""
    global _PEER_LOST
    _PEER_LOST = True


def started() -> bool:
    """True when this process is one of several of a ``jax.distributed`` run it started."""
    return _STARTED


def leave(status: int, timeout: float = 10.0) -> bool:
    """Before a process of a multi-process run ends with ``status``: True when it may end the
    way Python's exit does, False when it must end at once (``os._exit``).

    Python's exit runs jax's ``clean_up``, whose ``jax.distributed.shutdown`` waits in a
    barrier for every process. A process ending on its own (a signal that came outside the
    training loop's agreed stop, an error only it met) waited there for ever while the others
    waited for it in their next collective: neither ended, and the launcher, waiting for a
    failed process, never stopped the rest. The shutdown runs here in a thread for at most
    ``timeout`` seconds: processes that all end (an error they all meet, the loop's agreed
    stop) pass the barrier together, as before; a process alone in it gives up, and ends at
    once with its status, so that the launcher (``launch/local.sh``, ``srun``) sees the failure
    and stops the others.

    Status 0 is every process's normal end: the barrier is waited for as long as it takes (a
    process that gave up early would be taken for dead while process 0 still exports), but
    here, in Python, so that a stopping signal (``launch/local.sh`` stopping the job) is
    handled: before, a process in the barrier ignored it until killed (twenty-fourth probe
    M3)."""
    if not _STARTED:
        return True
    if status != 0 and _PEER_LOST:  # no barrier to pass with a process gone; and with the
        return False  # coordinator gone, jax's client aborts the process in it (twenty-seventh
        # probe MB6: "Fatal Python error: Aborted" and every thread's stack after the line)
    import threading

    over, passed = threading.Event(), []

    def shut() -> None:
        try:
            jax.distributed.shutdown()
            passed.append(True)
        except Exception:  # noqa: BLE001 - a peer already gone: the process ends either way
            pass
        finally:
            over.set()

    threading.Thread(target=shut, name="emit_jax-distributed-leave", daemon=True).start()
    if status != 0:
        return over.wait(timeout) and bool(passed)
    while not over.wait(0.5):  # short waits: the signal handlers run between them
        pass
    return bool(passed)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective with several processes: call it at
    the same point on every process), so that they take the same branch."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(_heard_while_waiting(
        multihost_utils.process_allgather, np.int32(bool(flag)))).any())


def is_primary() -> bool:
    """True on process 0, the one that writes logs, metrics, plots and exports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        _heard_while_waiting(multihost_utils.sync_global_devices, name)


def _heard_while_waiting(collective, *args):
    """``collective(*args)`` with the main thread's signal handlers running while it waits.

    A collective blocks inside C++, where Python runs no signal handler. When ``launch/local.sh``
    stops a job, the processes already in a collective (a barrier before the finished stage's
    model is written) did not hear its SIGTERM, while a process still in Python work before that
    barrier (process 0 has more of it) stopped: the others waited for it, and it waited 10 s for
    them (:func:`leave`) before ending alone (twenty-ninth probe U2: a Ctrl-C to a three-process run
    just after a stage's last step took 10.5 s, and local.sh then SIGKILLed two processes). The
    collective now runs in a helper thread while the main thread waits in short steps: a stopping
    signal raises there as anywhere else (every process stops together), and a signal held by the
    caller (a checkpoint's write) stays held. Off the main thread: called directly."""
    import threading  # noqa: PLC0415

    if threading.current_thread() is not threading.main_thread():
        return collective(*args)
    out: list = []
    over = threading.Event()

    def run() -> None:
        try:
            out.append((True, collective(*args)))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            out.append((False, e))
        finally:
            over.set()

    threading.Thread(target=run, name="emit_jax-collective", daemon=True).start()
    while not over.wait(0.25):  # short waits: the signal handlers run between them
        pass
    ok, value = out[0]
    if not ok:
        raise value
    return value


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


__all__ = ["DistributedArgs", "distributed_args_from_env", "initialize", "is_primary", "barrier",
           "replicate_module", "localize_module", "to_host"]
