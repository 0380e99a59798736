"""Data parallelism over every device of every process, and multi-process start-up.

A per-device step is a pure function `step(state, batch) -> (state, metrics)` that averages
its gradients with `jax.lax.pmean(..., DEVICE_AXIS)`. `data_parallel` wraps it with
`jax.pmap` or with `jax.jit(jax.shard_map(...))`; both take global arrays whose leaves carry
a leading device axis over `jax.devices()`, built by `replicate` and `shard_batch` from what
this process holds. With one process this is every local device; under
`jax.distributed` (`initialize_distributed`) the device axis spans all processes, each
process feeds and reads only its own devices, and collectives reach every device.
"""

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxretrieval.errors import JaxRetrievalError

logger = logging.getLogger(__name__)

DEVICE_AXIS = "devices"
# A process that stops sending heartbeats for this long is declared dead, and the others
# stop with JAX's "another task died" error instead of waiting in a collective for ever.
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60


def initialize_distributed(*, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           auto: bool = False,
                           heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
                           ) -> bool:
    """Joins a multi-process JAX run; returns False (a plain single-process run) when asked
    for neither explicit settings nor `auto`. Must run before anything else touches JAX.

    `auto` lets JAX read the cluster from the platform (TPU pod slices, SLURM, Open MPI;
    Kubernetes when the `kubernetes` client is installed and may list pods).
    """
    explicit = (coordinator_address, num_processes, process_id)
    if auto and any(value is not None for value in explicit):
        raise JaxRetrievalError(
            "--distributed=auto reads the cluster from the platform; drop --coordinator_address"
            ", --num_processes and --process_id, or drop --distributed=auto")
    if not auto and all(value is None for value in explicit):
        return False
    if heartbeat_timeout_seconds < 1:
        raise JaxRetrievalError(
            f"heartbeat timeout {heartbeat_timeout_seconds!r} s: use a whole number >= 1")
    if not auto:
        if any(value is None for value in explicit):
            raise JaxRetrievalError(
                "a multi-process run needs all of --coordinator_address HOST:PORT, "
                "--num_processes N and --process_id I (or --distributed=auto on a TPU pod "
                "slice or under SLURM)")
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise JaxRetrievalError(
                f"--coordinator_address {coordinator_address!r}: use HOST:PORT, the address "
                "of process 0 and a free port, the same on every process")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise JaxRetrievalError(
                f"--process_id {process_id} with --num_processes {num_processes}: process ids "
                "run from 0 to N-1, one per process")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    except (RuntimeError, ValueError) as err:
        where = ("the platform described no cluster (auto works on TPU pod slices, SLURM, "
                 "Open MPI, and Kubernetes with the kubernetes client); pass "
                 "--coordinator_address, --num_processes and --process_id"
                 if auto else "check that every process was given the same coordinator "
                 "address and process count, and that process 0 is running")
        raise JaxRetrievalError(f"could not join the multi-process run: {err}; {where}") from err
    logger.info("process %d of %d; %d local and %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary_process() -> bool:
    """Process 0 writes what there is one of: logs, metrics, the index."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches `name`; a no-op with one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def local_devices():
    return jax.local_devices()


def global_devices():
    """Every device of every process; each process's own devices are one contiguous run."""
    devices = jax.devices()
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[0] + len(mine))):
        raise JaxRetrievalError(
            "this process's devices are not contiguous in jax.devices(); the batch cannot be "
            "split by process (report this with your platform and JAX version)")
    return devices


def device_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices or global_devices()), (DEVICE_AXIS,))


def batch_sharding(devices=None) -> NamedSharding:
    """Arrays whose leading axis is split over `devices` (batches, per-device copies)."""
    return NamedSharding(device_mesh(devices), PartitionSpec(DEVICE_AXIS))


def _check_splits(size: int, parts: int, all_devices: int) -> None:
    if size % parts:
        raise JaxRetrievalError(
            f"a batch of {size} does not divide over {parts} devices; use a "
            f"global_batch_size that is a multiple of {all_devices}")


def process_share(global_size: int) -> slice:
    """The rows of a global batch (split evenly over every device) that this process feeds:
    its devices' blocks, which are contiguous."""
    devices = global_devices()
    _check_splits(global_size, len(devices), len(devices))
    per_device = global_size // len(devices)
    first = next(i for i, d in enumerate(devices) if d.process_index == jax.process_index())
    return slice(first * per_device, (first + jax.local_device_count()) * per_device)


def data_parallel(step_fn, wrapper: str, devices=None, donate_state: bool = True):
    """Wraps a per-device step over `devices` (default: all, of every process) with `pmap`
    or `shard_map`."""
    devices = devices or global_devices()
    donate = (0,) if donate_state else ()
    if wrapper == "pmap":
        return jax.pmap(step_fn, axis_name=DEVICE_AXIS, devices=devices, donate_argnums=donate)
    if wrapper == "shard_map":
        spec = PartitionSpec(DEVICE_AXIS)

        def per_shard(state, batch):
            # shard_map hands each device a block with a leading axis of 1; the step wants none.
            squeeze = lambda tree: jax.tree.map(lambda x: x[0], tree)
            expand = lambda tree: jax.tree.map(lambda x: x[None], tree)
            new_state, metrics = step_fn(squeeze(state), squeeze(batch))
            return expand(new_state), expand(metrics)

        mapped = jax.shard_map(per_shard, mesh=device_mesh(devices), in_specs=(spec, spec),
                               out_specs=(spec, spec))
        return jax.jit(mapped, donate_argnums=donate)
    raise JaxRetrievalError(f"bad config: parallel={wrapper!r}; use pmap or shard_map")


def _global_from_local_blocks(local_blocks, sharding):
    """A global array [devices, ...] from this process's blocks [local devices, ...]."""
    global_shape = (sharding.mesh.size,) + local_blocks.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local_blocks, global_shape)


def _local_count(devices):
    return sum(d.process_index == jax.process_index() for d in devices)


def replicate(tree, devices=None):
    """Copies a host pytree onto every device, as arrays with a leading device axis."""
    devices = devices or global_devices()
    local, sharding = _local_count(devices), batch_sharding(devices)
    return jax.tree.map(
        lambda x: _global_from_local_blocks(
            np.broadcast_to(np.asarray(x), (local,) + np.shape(x)), sharding), tree)


def unreplicate(tree):
    """This process's first device's copy of a replicated pytree, as host numpy arrays
    (fetched in one `device_get`, indexed on the host)."""
    first_shards = jax.device_get(jax.tree.map(lambda x: x.addressable_shards[0].data, tree))
    return jax.tree.map(lambda x: np.asarray(x)[0], first_shards)


def shard_batch(batch, devices=None):
    """This process's share of the global batch (host arrays [share, ...], see
    `process_share`) -> global arrays [devices, per_device, ...]."""
    devices = devices or global_devices()
    local, sharding = _local_count(devices), batch_sharding(devices)

    def split(x):
        _check_splits(x.shape[0], local, len(devices))
        return _global_from_local_blocks(x.reshape((local, -1) + x.shape[1:]), sharding)

    return jax.tree.map(split, batch)
