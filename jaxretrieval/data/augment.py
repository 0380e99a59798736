"""Random augmentation on device: pure functions traced into the compiled train step.

Geometry (random resized crop, rotation, translation, flip) is one inverse warp, so an image
is resampled once however many of them are on. Colour: brightness and contrast, then
saturation and hue (RGB only). Each is off at its neutral setting, and the steps that are
off are not traced at all, so turning a new one on leaves the others' random draws as
they were.
"""

import math

import jax
import jax.numpy as jnp

# The ITU-R BT.601 luma weights of R, G and B: the grey a saturation change blends towards.
LUMA = (0.299, 0.587, 0.114)
# Draws of the random resized crop before falling back to a centre crop: with the
# Inception ranges nearly every image finds a crop within the first few.
CROP_ATTEMPTS = 10


def preprocess(images_uint8: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [0, 1]; the model centres them itself."""
    return images_uint8.astype(jnp.float32) * (1.0 / 255.0)


def augment_batch(keys: jax.Array, images: jax.Array, augment_config) -> jax.Array:
    """Randomly crops and rescales, flips, rotates, translates and changes the brightness,
    contrast, saturation and hue of each image, as `augment_config` (config.augment) says.

    images: float32 [B, H, W, C] in [0, 1]; keys: [B] PRNG keys, one per image.
    """
    return jax.vmap(lambda key, image: _augment_image(key, image, augment_config))(keys, images)


def _augment_image(rng, image, cfg):
    height, width, channels = image.shape
    k_flip, k_angle, k_shift, k_bright, k_contrast = jax.random.split(rng, 5)
    # The newer steps draw from their own branch of the key, so the draws above stay as
    # they were for configs that leave those steps off.
    k_crop, k_saturation, k_hue = jax.random.split(jax.random.fold_in(rng, 1), 3)

    max_angle = jnp.deg2rad(cfg.max_rotation_degrees)
    angle = jax.random.uniform(k_angle, (), minval=-max_angle, maxval=max_angle)
    shift = jax.random.uniform(k_shift, (2,), minval=-cfg.max_translation,
                               maxval=cfg.max_translation) * jnp.array([height, width])
    flip = cfg.flip & (jax.random.uniform(k_flip) < 0.5)
    crop = None
    scale = tuple(cfg.get("crop_scale", (1.0, 1.0)))
    if scale != (1.0, 1.0):
        crop = sample_crop(k_crop, height, width, scale, tuple(cfg.get("crop_ratio", (1, 1))))
    image = warp_image(image, angle, shift, flip, crop)

    brightness = jax.random.uniform(k_bright, (), minval=-cfg.brightness, maxval=cfg.brightness)
    contrast = jax.random.uniform(k_contrast, (), minval=1.0 - cfg.contrast,
                                  maxval=1.0 + cfg.contrast)
    mean = image.mean()
    image = jnp.clip((image - mean) * contrast + mean + brightness, 0.0, 1.0)

    saturation, hue = cfg.get("saturation", 0.0), cfg.get("hue", 0.0)
    if channels == 3 and saturation:
        factor = jax.random.uniform(k_saturation, (), minval=1.0 - saturation,
                                    maxval=1.0 + saturation)
        grey = image @ jnp.array(LUMA, image.dtype)
        image = jnp.clip(grey[..., None] + factor * (image - grey[..., None]), 0.0, 1.0)
    if channels == 3 and hue:
        image = shift_hue(image, jax.random.uniform(k_hue, (), minval=-hue, maxval=hue))
    return image


def sample_crop(rng, height: int, width: int, scale, ratio):
    """An Inception-style random crop of a `height` x `width` image: its area a uniform
    share in `scale` of the image's, its aspect ratio (width / height) log-uniform in
    `ratio`, its place uniform over the positions where it fits. Where none of
    CROP_ATTEMPTS draws fits, the largest centred crop whose ratio lies in `ratio`.

    Returns (top, left, crop height, crop width) as float32 scalars, in pixels.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
    area = height * width * jax.random.uniform(k_area, (CROP_ATTEMPTS,), minval=scale[0],
                                               maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (CROP_ATTEMPTS,), minval=math.log(ratio[0]),
                                        maxval=math.log(ratio[1])))
    crop_w, crop_h = jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)
    fits = (crop_w <= width) & (crop_h <= height)
    first = jnp.argmax(fits)  # the first draw that fits (0 when none does)
    # The fallback: the whole image, narrowed to the nearest ratio in range.
    image_ratio = width / height
    fallback_w = min(width, height * ratio[1]) if image_ratio > ratio[1] else width
    fallback_h = min(height, width / ratio[0]) if image_ratio < ratio[0] else height
    crop_h = jnp.where(fits.any(), crop_h[first], fallback_h)
    crop_w = jnp.where(fits.any(), crop_w[first], fallback_w)
    top = jax.random.uniform(k_top, ()) * (height - crop_h)
    left = jax.random.uniform(k_left, ()) * (width - crop_w)
    top = jnp.where(fits.any(), top, (height - crop_h) / 2)
    left = jnp.where(fits.any(), left, (width - crop_w) / 2)
    return top, left, crop_h, crop_w


def shift_hue(image, amount):
    """Turns the hue of an RGB [H, W, 3] image in [0, 1] by `amount` of the colour circle,
    keeping each pixel's saturation and value (HSV)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    value = image.max(axis=-1)
    chroma = value - image.min(axis=-1)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    # Hue in sixths of the circle, from whichever channel is largest.
    hue = jnp.where(value == r, ((g - b) / safe) % 6.0,
                    jnp.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = jnp.where(chroma > 0, hue, 0.0)
    hue = (hue + 6.0 * amount) % 6.0
    # Back to RGB: each channel n is value - chroma * clip(min(k, 4 - k), 0, 1), with
    # k = (n + hue) mod 6 for n = 5, 3, 1.
    def channel(n):
        k = (n + hue) % 6.0
        return value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def warp_image(image, angle, shift, flip, crop=None):
    """Rotates [H, W, C] `image` by `angle` radians about its centre, mirrors it left-right
    if `flip`, and moves it by `shift` (rows, columns) pixels; edges repeat outward. With
    `crop` (top, left, height, width in pixels), that window of the image, scaled to the
    image's size, takes the image's place."""
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
    if crop is not None:
        # Pixel centres of the output spread evenly over the crop window.
        top, left, crop_h, crop_w = crop
        src_r = top + (src_r + 0.5) * (crop_h / height) - 0.5
        src_c = left + (src_c + 0.5) * (crop_w / width) - 0.5
    warp = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, [src_r, src_c], order=1, mode="nearest")
    return jax.vmap(warp, in_axes=2, out_axes=2)(image)
