"""Random resized crop and colour jitter: on device, off by default, seeded, in range."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval.config import base_config, validate_config
from jaxretrieval.data.augment import augment_batch, sample_crop, shift_hue, warp_image
from jaxretrieval.errors import JaxRetrievalError


def keys(seed, count):
    return jax.random.split(jax.random.PRNGKey(seed), count)


def still(**values):
    """config.augment with every step off except those in `values`."""
    config = base_config().augment
    config.update(dict(flip=False, max_rotation_degrees=0.0, max_translation=0.0,
                       brightness=0.0, contrast=0.0))
    config.update(values)
    return config


def images(shape=(4, 24, 32, 3), seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape)


def test_the_new_steps_are_off_by_default_and_leave_runs_as_they_were():
    defaults = base_config().augment
    assert tuple(defaults.crop_scale) == (1.0, 1.0)
    assert defaults.saturation == 0.0 and defaults.hue == 0.0
    x = images()
    np.testing.assert_allclose(augment_batch(keys(1, 4), x, still()), x, atol=1e-5)
    # The older steps draw from the image key's 5-way split as they always did (brightness
    # from its fourth key), so runs that leave the new steps off keep their augmentation.
    x = images((4, 8, 8, 3)) * 0.5 + 0.25  # away from the clip at 0 and 1
    image_keys = keys(2, 4)
    shift = jax.vmap(lambda k: jax.random.uniform(jax.random.split(k, 5)[3], (),
                                                  minval=-0.1, maxval=0.1))(image_keys)
    np.testing.assert_allclose(augment_batch(image_keys, x, still(brightness=0.1)),
                               x + shift[:, None, None, None], atol=1e-6)


@pytest.mark.parametrize("values", [dict(crop_scale=(0.08, 1.0)), dict(saturation=0.4),
                                    dict(hue=0.1)])
def test_each_new_step_keeps_shape_dtype_and_range_and_is_seeded(values):
    x = images()
    config = still(**values)
    a = jax.jit(lambda k, x: augment_batch(k, x, config))(keys(1, 4), x)
    b = augment_batch(keys(1, 4), x, config)
    c = augment_batch(keys(2, 4), x, config)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_allclose(a, b, atol=1e-5)  # same keys, same images (jit or not)
    assert float(jnp.abs(a - x).mean()) > 0.005  # it does something
    assert float(jnp.abs(a - c).mean()) > 0.005  # and something else under other keys
    # Each image of the batch gets its own draw.
    assert float(jnp.abs((a[0] - x[0]) - (a[1] - x[1])).mean()) > 1e-3


def test_crops_stay_in_the_image_with_area_and_ratio_in_range():
    height, width, scale, ratio = 24, 40, (0.08, 1.0), (3 / 4, 4 / 3)
    top, left, crop_h, crop_w = jax.vmap(
        lambda k: sample_crop(k, height, width, scale, ratio))(keys(3, 2000))
    assert float(top.min()) >= 0 and float(left.min()) >= 0
    assert float((top + crop_h).max()) <= height + 1e-4
    assert float((left + crop_w).max()) <= width + 1e-4
    share = crop_h * crop_w / (height * width)
    assert float(share.min()) >= scale[0] - 1e-5 and float(share.max()) <= scale[1] + 1e-5
    aspect = crop_w / crop_h
    assert float(aspect.min()) >= ratio[0] - 1e-4 and float(aspect.max()) <= ratio[1] + 1e-4
    # The draws spread over the ranges and the positions, not one corner.
    assert float(share.max()) > 0.6 and float(share.min()) < 0.15
    assert float(jnp.std(top)) > 1.0 and float(jnp.std(left)) > 1.0


def test_a_crop_that_cannot_fit_falls_back_to_the_centre():
    # A strip 4 high, 64 wide: at full area no ratio in (0.9, 1.1) fits.
    top, left, crop_h, crop_w = sample_crop(jax.random.PRNGKey(0), 4, 64, (1.0, 1.0),
                                            (0.9, 1.1))
    np.testing.assert_allclose([top, crop_h, crop_w, left], [0, 4, 4.4, 29.8], atol=1e-5)


def test_the_crop_window_is_what_the_warp_samples():
    image = jnp.arange(8 * 8, dtype=jnp.float32).reshape(8, 8, 1)
    none = jnp.zeros(2)
    whole = warp_image(image, 0.0, none, False, (0.0, 0.0, 8.0, 8.0))
    np.testing.assert_allclose(whole, image, atol=1e-4)  # the whole image is the identity
    # The 4x4 window at (2, 4) scaled 2x: output pixel (i, j) samples the image at
    # (2 + (i + 0.5) / 2 - 0.5, 4 + (j + 0.5) / 2 - 0.5), bilinearly.
    zoomed = warp_image(image, 0.0, none, False, (2.0, 4.0, 4.0, 4.0))
    for (i, j) in ((0, 0), (1, 1), (7, 0), (3, 5)):
        row, col = 1.75 + i / 2, 3.75 + j / 2
        np.testing.assert_allclose(float(zoomed[i, j, 0]), row * 8 + col, atol=1e-4)


def test_hue_turns_the_colour_circle_and_keeps_grey():
    red = jnp.array([[[1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(shift_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-6)
    np.testing.assert_allclose(shift_hue(red, -1 / 3), [[[0.0, 0.0, 1.0]]], atol=1e-6)
    x = images((1, 6, 6, 3))[0]
    np.testing.assert_allclose(shift_hue(x, 1.0), x, atol=1e-5)  # a full turn
    np.testing.assert_allclose(shift_hue(shift_hue(x, 0.2), -0.2), x, atol=1e-5)
    grey = jnp.full((2, 2, 3), 0.4)
    np.testing.assert_allclose(shift_hue(grey, 0.25), grey, atol=1e-6)


def test_saturation_and_hue_leave_grayscale_images_alone():
    x = images((2, 8, 8, 1))
    np.testing.assert_allclose(augment_batch(keys(1, 2), x, still(saturation=0.5, hue=0.2)),
                               x, atol=1e-5)


@pytest.mark.parametrize("key, value, message", [
    ("crop_scale", (0.0, 1.0), "crop_scale"), ("crop_scale", (0.5, 0.2), "crop_scale"),
    ("crop_scale", (0.5, 1.5), "crop_scale"), ("crop_scale", (0.5,), "crop_scale"),
    ("crop_ratio", (1.5, 1.0), "crop_ratio"), ("crop_ratio", (0.0, 1.0), "crop_ratio"),
    ("saturation", 1.5, "saturation"), ("hue", 0.6, "hue")])
def test_out_of_range_values_are_config_errors(key, value, message):
    config = base_config()
    config.channels = 3
    config.augment[key] = value
    with pytest.raises(JaxRetrievalError, match=message):
        validate_config(config)


def test_colour_jitter_needs_colour_channels():
    config = base_config()  # digits: one channel
    config.augment.hue = 0.1
    with pytest.raises(JaxRetrievalError, match="channels=1"):
        validate_config(config)
    config.channels = 3
    config.augment.crop_scale, config.augment.crop_ratio = (0.08, 1.0), (0.75, math.e)
    validate_config(config)
