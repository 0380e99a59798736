"""Random augmentation on device: pure functions traced into the compiled train step."""

import jax
import jax.numpy as jnp


def preprocess(images_uint8: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [0, 1]; the model centres them itself."""
    return images_uint8.astype(jnp.float32) * (1.0 / 255.0)


def augment_batch(keys: jax.Array, images: jax.Array, augment_config) -> jax.Array:
    """Randomly flips, rotates, translates and changes brightness/contrast of each image.

    images: float32 [B, H, W, C] in [0, 1]; keys: [B] PRNG keys, one per image.
    """
    return jax.vmap(lambda key, image: _augment_image(key, image, augment_config))(keys, images)


def _augment_image(rng, image, cfg):
    height, width, _ = image.shape
    k_flip, k_angle, k_shift, k_bright, k_contrast = jax.random.split(rng, 5)

    max_angle = jnp.deg2rad(cfg.max_rotation_degrees)
    angle = jax.random.uniform(k_angle, (), minval=-max_angle, maxval=max_angle)
    shift = jax.random.uniform(k_shift, (2,), minval=-cfg.max_translation,
                               maxval=cfg.max_translation) * jnp.array([height, width])
    flip = cfg.flip & (jax.random.uniform(k_flip) < 0.5)
    image = warp_image(image, angle, shift, flip)

    brightness = jax.random.uniform(k_bright, (), minval=-cfg.brightness, maxval=cfg.brightness)
    contrast = jax.random.uniform(k_contrast, (), minval=1.0 - cfg.contrast,
                                  maxval=1.0 + cfg.contrast)
    mean = image.mean()
    image = (image - mean) * contrast + mean + brightness
    return jnp.clip(image, 0.0, 1.0)


def warp_image(image, angle, shift, flip):
    """Rotates [H, W, C] `image` by `angle` radians about its centre, mirrors it left-right
    if `flip`, and moves it by `shift` (rows, columns) pixels; edges repeat outward."""
    height, width, _ = image.shape
    flip = jnp.where(flip, -1.0, 1.0)
    # One inverse warp for rotation, translation and flip: for every output pixel, find the
    # input position it comes from (rotate about the centre), then sample bilinearly.
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                              jnp.arange(width, dtype=jnp.float32), indexing="ij")
    centre_r, centre_c = (height - 1) / 2.0, (width - 1) / 2.0
    r, c = rows - centre_r - shift[0], (cols - centre_c - shift[1]) * flip
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_r = cos * r - sin * c + centre_r
    src_c = sin * r + cos * c + centre_c
    warp = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, [src_r, src_c], order=1, mode="nearest")
    return jax.vmap(warp, in_axes=2, out_axes=2)(image)
