"""CheckpointStore: Orbax checkpoints of a host pytree, restorable on any device count."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from jaxretrieval import parallel
from jaxretrieval.checkpoint import CheckpointStore, open_for_reading
from jaxretrieval.errors import JaxRetrievalError


def state_at(step):
    """A train-state-like pytree whose values say which step they belong to."""
    rng = np.random.default_rng(step)
    return {"step": np.array(step, np.int32),
            "params": {"model": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                                 "bias": np.full((4,), step, np.float32)},
                       "loss": {}},
            "batch_stats": {"mean": rng.normal(size=(4,)).astype(np.float32)}}


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(g, np.ndarray) and g.dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(g, w)


def saved_steps(directory):
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_saved_states_restore_as_host_arrays_by_step(tmp_path):
    with CheckpointStore(str(tmp_path / "ckpt")) as store:
        assert store.latest_step() is None
        for step in (1, 2, 3):
            store.save(step, state_at(step))
        store.wait()
        assert store.latest_step() == 3
        assert_trees_equal(store.restore(), state_at(3))
        assert_trees_equal(store.restore(2), state_at(2))


def test_only_the_last_keep_checkpoints_stay_on_disk(tmp_path):
    directory = str(tmp_path / "ckpt")
    with CheckpointStore(directory, keep=2) as store:
        for step in range(1, 6):
            store.save(step, state_at(step))
            store.wait()
        assert saved_steps(directory) == [4, 5]
        assert_trees_equal(store.restore(4), state_at(4))


def test_saves_are_due_every_n_steps_only(tmp_path):
    with CheckpointStore(str(tmp_path / "ckpt"), every_steps=3) as store:
        assert [step for step in range(1, 11) if store.should_save(step)] == [3, 6, 9]


def test_restoring_onto_a_target_checks_that_the_shapes_fit(tmp_path):
    with CheckpointStore(str(tmp_path / "ckpt")) as store:
        store.save(7, state_at(7))
        store.wait()
        target = jax.tree.map(np.zeros_like, state_at(0))
        assert_trees_equal(store.restore(target=target), state_at(7))

        wider = state_at(0)
        wider["params"]["model"]["kernel"] = np.zeros((3, 5), np.float32)
        with pytest.raises(JaxRetrievalError, match=r"step 7 .* does not fit this model "
                                                    r".*kernel.*\(3, 4\) saved, \(3, 5\) expected"):
            store.restore(target=wider)


def test_restoring_from_an_empty_store_says_to_train_first(tmp_path):
    with CheckpointStore(str(tmp_path / "ckpt")) as store:
        with pytest.raises(JaxRetrievalError, match="no checkpoint in .*train first"):
            store.restore()


def test_a_workdirs_checkpoints_open_read_only(tmp_path):
    with pytest.raises(JaxRetrievalError, match="no checkpoints in .*train into it first"):
        open_for_reading(str(tmp_path))
    with CheckpointStore(str(tmp_path / "checkpoints")) as store:
        store.save(4, state_at(4))
        store.wait()
    with open_for_reading(str(tmp_path)) as reader:
        assert reader.latest_step() == 4
        assert_trees_equal(reader.restore(), state_at(4))


def test_a_state_replicated_on_four_devices_restores_on_one(tmp_path):
    # Training saves `unreplicate(state)`: one host copy, whatever the device count.
    devices = jax.local_devices()[:4]
    assert len(devices) == 4
    replicated = parallel.replicate(state_at(9), devices)
    doubled = jax.pmap(lambda tree: jax.tree.map(lambda x: x * 2, tree), devices=devices)(
        replicated)  # computed on the devices, so the saved values come from there
    with CheckpointStore(str(tmp_path / "checkpoints")) as store:
        store.save(9, parallel.unreplicate(doubled))
        store.wait()
    code = (
        "import sys, jax, numpy as np\n"
        "from jaxretrieval.checkpoint import open_for_reading\n"
        "assert jax.local_device_count() == 1\n"
        "with open_for_reading(sys.argv[1]) as store:\n"
        "    state = store.restore()\n"
        "np.savez(sys.argv[2], *jax.tree.leaves(state))\n")
    out = str(tmp_path / "restored.npz")
    result = run_python(code, tmp_path, out, devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out) as restored:
        leaves = [restored[f"arr_{i}"] for i in range(len(restored.files))]
    want = jax.tree.leaves(jax.tree.map(lambda x: np.asarray(jnp.asarray(x) * 2), state_at(9)))
    assert len(leaves) == len(want)
    for got, expected in zip(leaves, want):
        np.testing.assert_array_equal(got, expected)


def test_opening_a_checkpoint_read_only_does_not_warn(tmp_path):
    import logging

    with CheckpointStore(str(tmp_path / "c"), asynchronous=False) as store:
        store.save(1, {"a": np.zeros(3)})
    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.addHandler(handler)
    absl_logger.setLevel(logging.DEBUG)
    try:
        with CheckpointStore(str(tmp_path / "c"), read_only=True,
                             asynchronous=False) as store:
            assert store.latest_step() == 1
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(level)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not warnings
