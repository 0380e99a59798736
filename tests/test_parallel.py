"""Data parallelism on the four fake CPU devices: batch shares, device copies, the wrappers.

Several processes (jax.distributed) are covered by tests/test_multihost.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval import parallel
from jaxretrieval.errors import JaxRetrievalError

NUM_DEVICES = 4


@pytest.fixture(autouse=True)
def four_devices():
    assert jax.device_count() == NUM_DEVICES and jax.process_count() == 1


def test_one_process_feeds_the_whole_batch():
    assert parallel.process_share(12) == slice(0, 12)
    assert parallel.is_primary_process()
    assert parallel.global_devices() == jax.devices()
    parallel.barrier("alone")  # returns at once with one process


@pytest.mark.parametrize("size", [1, 6, 10])
def test_a_batch_that_does_not_divide_over_the_devices_names_the_multiple(size):
    message = f"a batch of {size} does not divide over 4 devices; use a global_batch_size " \
              "that is a multiple of 4"
    with pytest.raises(JaxRetrievalError, match=message):
        parallel.process_share(size)
    with pytest.raises(JaxRetrievalError, match=message):
        parallel.shard_batch({"x": np.zeros((size, 2))})


def test_shard_batch_gives_each_device_its_block_in_order():
    batch = {"images": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
             "labels": np.arange(8, dtype=np.int32) * 10}
    sharded = parallel.shard_batch(batch)
    assert sharded["images"].shape == (NUM_DEVICES, 2, 3)
    assert sharded["labels"].shape == (NUM_DEVICES, 2) and sharded["labels"].dtype == np.int32
    devices = jax.devices()
    for shard in sharded["labels"].addressable_shards:
        block = devices.index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data)[0], batch["labels"][2 * block:
                                                                                 2 * block + 2])
    np.testing.assert_array_equal(np.asarray(sharded["images"]).reshape(8, 3), batch["images"])


def test_replicate_puts_a_copy_on_every_device_and_unreplicate_takes_it_back():
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(5, np.int32),
            "nested": [np.ones(4, np.float32) * 0.5]}
    replicated = parallel.replicate(tree)
    for leaf, original in zip(jax.tree.leaves(replicated), jax.tree.leaves(tree)):
        assert leaf.shape == (NUM_DEVICES,) + np.shape(original)
        assert {shard.device for shard in leaf.addressable_shards} == set(jax.devices())
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data)[0], original)
    back = parallel.unreplicate(replicated)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert not isinstance(got, jax.Array) and np.asarray(got).dtype == want.dtype  # host
        np.testing.assert_array_equal(got, want)


def toy_step(state, batch):
    """One SGD step of least squares on this device's rows, gradients averaged over all."""
    def loss_fn(w):
        return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

    loss, grad = jax.value_and_grad(loss_fn)(state["w"])
    grad = jax.lax.pmean(grad, parallel.DEVICE_AXIS)
    new_state = {"w": state["w"] - 0.1 * grad, "step": state["step"] + 1}
    return new_state, {"loss": jax.lax.pmean(loss, parallel.DEVICE_AXIS)}


def toy_problem(steps=3, rows=16, dim=5):
    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=dim).astype(np.float32), "step": np.array(0, np.int32)}
    batches = [{"x": rng.normal(size=(rows, dim)).astype(np.float32),
                "y": rng.normal(size=rows).astype(np.float32)} for _ in range(steps)]
    return state, batches


def run_wrapped(wrapper):
    state, batches = toy_problem()
    step = parallel.data_parallel(toy_step, wrapper)
    state, losses = parallel.replicate(state), []
    for batch in batches:
        state, metrics = step(state, parallel.shard_batch(batch))
        losses.append(parallel.unreplicate(metrics)["loss"])
    return parallel.unreplicate(state), np.array(losses)


def run_on_one_device():
    # Equal shares: the mean of the devices' mean gradients is the whole batch's.
    state, batches = toy_problem()
    w, losses = state["w"].astype(np.float64), []
    for batch in batches:
        residual = batch["x"] @ w - batch["y"]
        losses.append(np.mean(residual ** 2))
        w = w - 0.1 * 2 * batch["x"].T @ residual / len(residual)
    return w, np.array(losses)


def test_pmap_and_shard_map_run_a_step_alike_and_as_one_device_would():
    pmap_state, pmap_losses = run_wrapped("pmap")
    shard_map_state, shard_map_losses = run_wrapped("shard_map")
    assert pmap_state["step"] == shard_map_state["step"] == 3
    np.testing.assert_allclose(shard_map_state["w"], pmap_state["w"], rtol=1e-6)
    np.testing.assert_allclose(shard_map_losses, pmap_losses, rtol=1e-6)
    want_w, want_losses = run_on_one_device()
    np.testing.assert_allclose(pmap_state["w"], want_w, rtol=1e-5)
    np.testing.assert_allclose(pmap_losses, want_losses, rtol=1e-5)
    assert np.abs(want_w - toy_problem()[0]["w"]).max() > 1e-2  # the steps moved w


def test_data_parallel_runs_on_the_devices_it_is_given():
    devices = jax.devices()[:2]
    state, batches = toy_problem(steps=1, rows=4)
    step = parallel.data_parallel(toy_step, "shard_map", devices, donate_state=False)
    replicated = parallel.replicate(state, devices)
    new_state, _ = step(replicated, parallel.shard_batch(batches[0], devices))
    assert new_state["w"].shape == (2,) + state["w"].shape
    assert {shard.device for shard in new_state["w"].addressable_shards} == set(devices)
    # Not donated: the input state is still readable.
    np.testing.assert_array_equal(parallel.unreplicate(replicated)["w"], state["w"])


def test_an_unknown_wrapper_names_the_known_ones():
    with pytest.raises(JaxRetrievalError, match="parallel='vmap'; use pmap or shard_map"):
        parallel.data_parallel(toy_step, "vmap")
