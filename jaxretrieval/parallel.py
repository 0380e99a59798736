"""Data parallelism over the local devices: one place that wraps a per-device step.

A per-device step is a pure function `step(state, batch) -> (state, metrics)` that averages
its gradients with `jax.lax.pmean(..., DEVICE_AXIS)`. `data_parallel` wraps it with
`jax.pmap` or with `jax.jit(jax.shard_map(...))`; both take and return the same layout: every
leaf of the state and the batch carries a leading device axis.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxretrieval.errors import JaxRetrievalError

DEVICE_AXIS = "devices"


def local_devices():
    return jax.local_devices()


def device_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices or local_devices()), (DEVICE_AXIS,))


def data_parallel(step_fn, wrapper: str, devices=None, donate_state: bool = True):
    """Wraps a per-device step over all local devices with `pmap` or `shard_map`."""
    devices = devices or local_devices()
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


def replicate(tree, devices=None):
    """Copies a host pytree onto every device, as arrays with a leading device axis."""
    devices = devices or local_devices()
    sharding = NamedSharding(device_mesh(devices), PartitionSpec(DEVICE_AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)),
                                 sharding), tree)


def unreplicate(tree):
    """The first device's copy of a replicated pytree, as host numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data[0]), tree)


def shard_batch(batch, devices=None):
    """Splits host arrays [global_batch, ...] into [devices, per_device, ...] on the devices."""
    devices = devices or local_devices()
    num_devices = len(devices)
    sharding = NamedSharding(device_mesh(devices), PartitionSpec(DEVICE_AXIS))

    def split(x):
        if x.shape[0] % num_devices:
            raise JaxRetrievalError(
                f"a batch of {x.shape[0]} does not divide over {num_devices} devices; use a "
                f"global_batch_size that is a multiple of {num_devices}")
        return jax.device_put(x.reshape((num_devices, -1) + x.shape[1:]), sharding)

    return jax.tree.map(split, batch)
