"""The seed CNN, its heads, and on-device augmentation."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from conftest import REPO
from jaxretrieval.config import base_config, load_config_file
from jaxretrieval.data.augment import augment_batch, warp_image
from jaxretrieval.models import GeM, build_model


def init(config, batch=2):
    model = build_model(config)
    x = jnp.zeros((batch, config.image_size, config.image_size, config.channels))
    variables = model.init(jax.random.PRNGKey(0), x)
    return model, variables, x


def test_seed_cnn_has_the_seed_layer_shapes():
    config = load_config_file(os.path.join(REPO, "configs", "seed_cnn.py"))
    model, variables, _ = init(config)
    params = jax.tree.map(np.shape, variables["params"])
    backbone = params["backbone"]
    assert [backbone[f"Conv_{i}"]["kernel"] for i in range(3)] == [
        (3, 3, 3, 32), (3, 3, 32, 64), (3, 3, 64, 128)]
    # 224 -conv-> 222 -pool-> 111 -conv-> 109 -pool-> 54 -conv-> 52 -pool-> 26; flatten.
    assert params["projection"]["kernel"] == (26 * 26 * 128, 128)


def test_embeddings_are_unit_vectors():
    for name in ("seed_cnn", "resnet18"):
        config = base_config()
        config.model.name = name
        config.model.num_filters = 8
        model, variables, _ = init(config, batch=3)
        x = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 1))
        out = model.apply(variables, x)
        assert out.shape == (3, config.embedding_dim) and out.dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_every_pooling_runs():
    for pooling in ("flatten", "avg", "max", "gem"):
        config = base_config()
        config.model.pooling = pooling
        model, variables, x = init(config)
        assert model.apply(variables, x).shape == (2, config.embedding_dim)


def test_gem_is_average_at_p1_and_near_max_at_large_p():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 3)) + 0.1
    at_1 = GeM(initial_p=1.0).apply({"params": {"p": jnp.array(1.0)}}, x)
    np.testing.assert_allclose(at_1, x.mean(axis=(1, 2)), rtol=1e-5)
    at_64 = GeM().apply({"params": {"p": jnp.array(64.0)}}, x)
    np.testing.assert_allclose(at_64, x.max(axis=(1, 2)), rtol=0.05)


def keys(seed, count):
    return jax.random.split(jax.random.PRNGKey(seed), count)


def augment_config(**values):
    config = ml_collections.ConfigDict(dict(
        enabled=True, flip=False, max_rotation_degrees=0.0, max_translation=0.0,
        brightness=0.0, contrast=0.0))
    config.update(values)
    return config


def test_augmentation_with_zero_strength_is_the_identity():
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 1))
    out = augment_batch(keys(1, 4), x, augment_config())
    np.testing.assert_allclose(out, x, atol=1e-5)


def test_augmentation_changes_images_within_range_and_is_seeded():
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3))
    config = augment_config(flip=True, max_rotation_degrees=10.0, max_translation=0.1,
                            brightness=0.1, contrast=0.1)
    a = augment_batch(keys(1, 4), x, config)
    b = augment_batch(keys(1, 4), x, config)
    c = augment_batch(keys(2, 4), x, config)
    assert a.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - x).mean()) > 0.01 and float(jnp.abs(a - c).mean()) > 0.01


def test_a_flip_alone_mirrors_the_image():
    x = jax.random.uniform(jax.random.PRNGKey(0), (16, 8, 8, 1))
    out = augment_batch(keys(3, 16), x, augment_config(flip=True))
    flipped = [bool(jnp.allclose(o, i[:, ::-1], atol=1e-5)) for o, i in zip(out, x)]
    kept = [bool(jnp.allclose(o, i, atol=1e-5)) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def one_hot_image(row, col, size=9):
    return jnp.zeros((size, size, 1)).at[row, col, 0].set(1.0)


def lit_pixel(image):
    return tuple(int(i) for i in np.unravel_index(np.argmax(image[..., 0]), image.shape[:2]))


def test_warp_moves_pixels_where_the_geometry_says():
    image = one_hot_image(2, 4)  # two rows above the centre (4, 4)
    no_shift = jnp.zeros(2)
    assert lit_pixel(warp_image(image, 0.0, jnp.array([1.0, 0.0]), False)) == (3, 4)
    assert lit_pixel(warp_image(image, 0.0, jnp.array([0.0, -2.0]), False)) == (2, 2)
    assert lit_pixel(warp_image(one_hot_image(2, 1), 0.0, no_shift, True)) == (2, 7)
    # A quarter turn either way keeps the distance to the centre: the pixel lands beside it.
    quarter = {lit_pixel(warp_image(image, s * np.pi / 2, no_shift, False)) for s in (1, -1)}
    assert quarter == {(4, 2), (4, 6)}
    half = warp_image(image, np.pi, no_shift, False)
    assert lit_pixel(half) == (6, 4)
    np.testing.assert_allclose(float(half.sum()), 1.0, atol=1e-4)


def test_reshape_max_pool_equals_reduce_window_in_value_and_gradient():
    import flax.linen as nn

    from jaxretrieval.models.cnn import max_pool_2x2

    ties = jnp.zeros((2, 6, 6, 2)).at[:, ::3, ::2].set(1.0)  # equal maxima inside windows
    for x in (jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3)),
              jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, 4)),  # odd sides: cropped
              jax.nn.relu(jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))), ties):
        reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
        np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
        weights = jax.random.normal(jax.random.PRNGKey(1), reference(x).shape)
        grad = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * weights))(x)
        grad_reference = jax.grad(lambda x: jnp.sum(reference(x) * weights))(x)
        np.testing.assert_allclose(grad, grad_reference, atol=1e-6)
        jitted = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * weights)))(x)
        np.testing.assert_allclose(jitted, grad_reference, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters_and_embeds_like_float32():
    for name in ("seed_cnn", "resnet18"):
        config = base_config()
        config.model.name = name
        config.model.num_filters = 8
        model_f32, variables, _ = init(config)
        config.dtype = "bfloat16"
        model_bf16, variables_bf16, _ = init(config)
        # Same parameters, all float32: a checkpoint serves either dtype.
        assert jax.tree.map(lambda p: (p.shape, p.dtype), variables_bf16) == jax.tree.map(
            lambda p: (p.shape, jnp.dtype(jnp.float32)), variables)
        x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 1))
        bf16 = model_bf16.apply(variables, x)
        f32 = model_f32.apply(variables, x)
        assert bf16.dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
        # bfloat16 keeps 8 bits of mantissa: close to float32, not equal.
        cosine = np.sum(np.asarray(bf16) * np.asarray(f32), axis=1)
        assert np.all(cosine > 0.98) and not np.allclose(bf16, f32, atol=1e-6), cosine


def test_bfloat16_compute_gives_finite_float32_gradients():
    config = base_config()
    config.dtype = "bfloat16"
    model, variables, _ = init(config)
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 32, 32, 1))

    def loss(params):
        embeddings, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    x, train=True, mutable=["batch_stats"])
        return jnp.sum(embeddings[0] * embeddings[1])

    grads = jax.grad(loss)(variables["params"])
    leaves = jax.tree.leaves(grads)
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in leaves)
    assert any(np.abs(g).max() > 0 for g in leaves)
