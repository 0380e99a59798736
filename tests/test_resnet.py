"""ResNet backbones: standard sizes and shapes, BatchNorm modes, cross-device BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models.resnet import ResNet, resnet18, resnet50
from jaxretrieval.parallel import DEVICE_AXIS, device_mesh


def abstract_init(model, image_size):
    """Variables and output as shapes only: ResNet-50 at 224x224 costs no memory or time."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return variables, jax.eval_shape(model.apply, variables, x)


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def tiny_resnet18(**kwargs):
    """Narrow enough to run in well under a second on a CPU."""
    return resnet18(num_filters=8, small_stem=True, **kwargs)


def tiny_batch(size=8, seed=1):
    return jax.random.normal(jax.random.key(seed), (size, 16, 16, 3))


@pytest.fixture(scope="module")
def tiny_variables():
    """One init shared by the tests: compiling the initialisers dominates their run time.

    An "rbg" key compiles about 3x faster on CPU than the default threefry.
    """
    init = jax.jit(tiny_resnet18().init)
    return init(jax.random.key(0, impl="rbg"), tiny_batch(1))


# torchvision's totals less the 1000-way fc: 11,689,512 - (512 * 1000 + 1000) and
# 25,557,032 - (2048 * 1000 + 1000). Flax params hold conv kernels and BN scale/bias, the
# same set as torchvision's parameters(); running statistics live in batch_stats.
@pytest.mark.parametrize("make, params, channels", [
    (resnet18, 11_176_512, 512),
    (resnet50, 23_508_032, 2048),
])
def test_imagenet_sizes_match_the_standard_architectures(make, params, channels):
    variables, out = abstract_init(make(), 224)
    assert count(variables["params"]) == params
    assert out.shape == (1, 7, 7, channels)


def test_small_stem_keeps_resolution_until_the_strided_stages():
    variables, out = abstract_init(resnet18(small_stem=True), 32)
    assert out.shape == (1, 4, 4, 512)  # 32 -> 32, 16, 8, 4: only stages 2..4 halve it
    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 64)


def test_bottleneck_strides_the_3x3_conv_and_projects_the_shortcut():
    variables, _ = abstract_init(resnet50(), 224)
    block = jax.tree.map(lambda leaf: leaf.shape, variables["params"]["stage2_block1"])
    assert block["conv1"]["kernel"] == (1, 1, 256, 128)
    assert block["conv2"]["kernel"] == (3, 3, 128, 128)
    assert block["conv3"]["kernel"] == (1, 1, 128, 512)
    assert block["shortcut_conv"]["kernel"] == (1, 1, 256, 512)
    # Later blocks keep the shape, so they add the input itself.
    assert "shortcut_conv" not in variables["params"]["stage2_block2"]


def test_compute_dtype_is_separate_from_the_param_dtype():
    variables, out = abstract_init(tiny_resnet18(dtype=jnp.bfloat16), 16)
    assert out.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_each_residual_branch_starts_at_zero(tiny_variables):
    variables = tiny_variables
    for name, block in variables["params"].items():
        if name.startswith("stage"):
            np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)
            np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
            if "shortcut_bn" in block:
                np.testing.assert_array_equal(block["shortcut_bn"]["scale"], 1.0)
    # Bias-free convs: BatchNorm's own bias follows each one.
    assert "bias" not in variables["params"]["stem_conv"]


def test_training_updates_running_stats_that_evaluation_then_uses(tiny_variables):
    model = tiny_resnet18()
    x = tiny_batch()
    variables = tiny_variables
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                               capture_intermediates=lambda mdl, _: mdl.name == "stem_conv")
    assert out.shape == (8, 2, 2, 64)  # 16 -> 16, 8, 4, 2; 8 * 2 ** 3 channels
    assert bool(jnp.all(out >= 0))  # after the last ReLU

    # momentum 0.9: running = 0.9 * running (mean 0, var 1 at init) + 0.1 * batch.
    stem = updates["intermediates"]["stem_conv"]["__call__"][0]
    stem_stats = updates["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(stem_stats["mean"], 0.1 * stem.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stem_stats["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)),
                               rtol=1e-4)

    trained = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    eval_out = model.apply(trained, x)
    assert not np.allclose(eval_out, out, atol=1e-3)  # running averages, not batch stats
    assert not np.allclose(eval_out, model.apply(variables, x), atol=1e-3)  # the new ones
    # Running averages make each example's features independent of the rest of the batch.
    np.testing.assert_allclose(model.apply(trained, x[:3]), eval_out[:3], atol=1e-5)


def pmap_train_step(model, variables, shards):
    return jax.pmap(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        axis_name=DEVICE_AXIS, in_axes=(None, 0))(variables, shards)


def shard_map_train_step(model, variables, shards):
    def per_device(x):
        out, updates = model.apply(variables, x[0], train=True, mutable=["batch_stats"])
        return jax.tree.map(lambda leaf: leaf[None], (out, updates))

    spec = PartitionSpec(DEVICE_AXIS)
    return jax.jit(jax.shard_map(per_device, mesh=device_mesh(), in_specs=spec,
                                 out_specs=spec))(shards)


@pytest.mark.parametrize("train_step", [pmap_train_step, shard_map_train_step])
def test_batch_norm_statistics_are_shared_across_devices(train_step, tiny_variables):
    num_devices = jax.local_device_count()
    assert num_devices == 4  # conftest's fake CPU devices
    x = tiny_batch(8)
    single = tiny_resnet18()
    # Unit BN scales, so that every residual branch, not just the shortcuts, reaches the output.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.ones_like(leaf) if path[-1].key == "scale" else leaf,
        tiny_variables)
    whole_out, whole_updates = single.apply(variables, x, train=True, mutable=["batch_stats"])

    synced = tiny_resnet18(bn_axis_name=DEVICE_AXIS)
    shards = x.reshape(num_devices, 2, *x.shape[1:])
    out, updates = train_step(synced, variables, shards)

    # Float32 rounding differs between one sum over 8 and a sum of 4 partial sums; through
    # 17 BatchNorms that reaches about 1e-5 of the features' size.
    np.testing.assert_allclose(out.reshape(whole_out.shape), whole_out, rtol=1e-4, atol=1e-5)
    expected = jax.tree_util.tree_leaves_with_path(whole_updates["batch_stats"])
    got = jax.tree_util.tree_leaves_with_path(updates["batch_stats"])
    assert [path for path, _ in got] == [path for path, _ in expected]
    for (path, per_device), (_, whole) in zip(got, expected):
        assert per_device.shape == (num_devices,) + whole.shape
        for device in range(num_devices):
            np.testing.assert_allclose(per_device[device], per_device[0], atol=1e-6,
                                       err_msg=f"{jax.tree_util.keystr(path)} on {device}")
        np.testing.assert_allclose(per_device[0], whole, rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))

    # The check has teeth: two examples alone would give other statistics.
    _, local = single.apply(variables, x[:2], train=True, mutable=["batch_stats"])
    assert not np.allclose(local["batch_stats"]["stem_bn"]["var"],
                           whole_updates["batch_stats"]["stem_bn"]["var"], atol=1e-3)
    # Evaluation names no axis, so the synced model also runs outside pmap/shard_map.
    trained = {"params": variables["params"], "batch_stats": whole_updates["batch_stats"]}
    np.testing.assert_allclose(synced.apply(trained, x), single.apply(trained, x), atol=1e-6)


def test_unknown_block_is_a_config_error():
    with pytest.raises(JaxRetrievalError, match="bottleneck"):
        ResNet(stage_sizes=(1,), block="wide").init(jax.random.key(0), tiny_batch(1))
