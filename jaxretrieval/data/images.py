"""Turning any image a user has (a file, an array) into the model's uint8 input.

Every image decoded from a file or an upload is first turned upright by its EXIF
orientation tag (`upright`), as a photo viewer shows it, and then made 8-bit L or RGB
(`eight_bit`, `in_mode`): 16- and 32-bit greyscale and float images are scaled down rather
than clipped, and a colour mode Pillow cannot convert is one clear error.
"""

import dataclasses
import logging
import os
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxretrieval.errors import JaxRetrievalError

logger = logging.getLogger(__name__)

# The greyscale modes of more than 8 bits, which Pillow's own conversion to L clips at 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE_MODES = (*SIXTEEN_BIT_MODES, "I", "F")


def read_image_file(path: str) -> Image.Image:
    """Opens and fully decodes an image file, turned upright by its EXIF orientation; a
    missing or corrupt file names its path."""
    if not os.path.isfile(path):
        raise JaxRetrievalError(f"image file {path!r} not found")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here and not later
            return upright(image.copy())
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise JaxRetrievalError(
            f"cannot read image {path!r} ({err}); replace or remove the file") from None


def upright(image: Image.Image) -> Image.Image:
    """`image` rotated and flipped as its EXIF orientation tag says (in place)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error) as err:
        # A damaged EXIF block is no reason to refuse the pixels.
        logger.info("ignoring the unreadable EXIF orientation of an image (%s)", err)
    return image


def eight_bit(image: Image.Image) -> Image.Image:
    """`image` with 8 bits per channel: 16-bit greyscale (I;16) scaled from 0..65535 to
    0..255 as mode L; 32-bit integers (I) the same when they lie in 0..65535, else from
    their own minimum..maximum; floats (F) from 0..1 when they lie there, else from their
    own minimum..maximum. Pillow's own conversion clips these at 255 instead, which leaves
    a black and white image. Other modes are returned as they are."""
    if image.mode not in WIDE_MODES:
        return image
    values = np.asarray(image).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` (8 bits per channel, see `eight_bit`) converted to `mode` (L or RGB), through
    RGB where Pillow has no direct conversion (LAB to L); a JaxRetrievalError for a colour
    mode Pillow cannot convert at all."""
    if image.mode == mode:
        return image
    try:
        return image.convert(mode)
    except ValueError:
        pass
    try:
        return image.convert("RGB").convert(mode)
    except ValueError:
        raise JaxRetrievalError(
            f"the image's colour mode {image.mode} cannot be converted to {mode}; save it as "
            "an RGB or greyscale PNG or JPEG") from None


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How any image becomes the model's uint8 input: a run's input convention, applied
    alike to the training data, the gallery, queries and uploads."""

    image_size: int
    channels: int
    # Cut each image to its face's aligned chip first (`faces.align_face`).
    align_faces: bool = False
    # 1: the whole image is resized to the square. Below 1: the shorter side is resized to
    # image_size / crop_fraction and the centre square is kept (ImageNet weights' evaluation
    # transform: 224 of 256 is 0.875).
    crop_fraction: float = 1.0

    @classmethod
    def of(cls, config) -> "InputSpec":
        return cls(config.image_size, config.channels, config.model.align_faces,
                   config.model.crop_fraction)


def to_model_input(image, spec: InputSpec) -> np.ndarray:
    """Returns uint8 [image_size, image_size, channels] from a PIL image or an HxW(xC) array.

    Grayscale and colour are converted to `spec.channels` (`eight_bit`, `in_mode`); the image is
    resized (bilinear) as `spec` says, as the training data was.
    """
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise JaxRetrievalError(
            f"expected an image array or a PIL image, got {type(image).__name__}")
    image = eight_bit(image)
    size = spec.image_size
    if spec.align_faces:
        from jaxretrieval.data.faces import align_face

        image = Image.fromarray(align_face(in_mode(image, "RGB"), size)[0])
    image = in_mode(image, "L" if spec.channels == 1 else "RGB")
    if spec.crop_fraction < 1:
        image = _centre_crop(image, size, spec.crop_fraction)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array.reshape(size, size, spec.channels)


def _centre_crop(image: Image.Image, size: int, fraction: float) -> Image.Image:
    """The shorter side resized to size / fraction, then the centre size x size square."""
    width, height = image.size
    scale = size / fraction / min(width, height)
    width, height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise JaxRetrievalError(
            f"image array has shape {array.shape}; pass HxW, HxWx1, HxWx3 or HxWx4")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
            raise JaxRetrievalError("image array must hold finite numbers; pass uint8 0-255")
        if array.min() < 0 or array.max() > 255:
            raise JaxRetrievalError(
                f"image values range {array.min()}..{array.max()}; pass uint8 0-255")
        array = np.round(array).astype(np.uint8)
    return Image.fromarray(array)


def load_images(images, spec: InputSpec) -> np.ndarray:
    """A batch of file paths and/or arrays -> uint8 [n, image_size, image_size, channels],
    each converted as `spec` says (`to_model_input`)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
        images = [images]  # one image given where a batch is expected
    out = np.empty((len(images), spec.image_size, spec.image_size, spec.channels), np.uint8)
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            image = read_image_file(os.fspath(image))
        out[i] = to_model_input(image, spec)
    return out


def decode_image_bytes(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decodes an uploaded image, turned upright by its EXIF orientation; refuses non-images,
    truncated files and decompression bombs.

    The pixel count is checked from the header, before any pixel is decoded, so a small file
    that claims a huge image costs nothing.
    """
    import io

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise JaxRetrievalError("the upload is not an image Pillow can read; send a PNG, "
                                "JPEG, GIF or another common format") from None
    except Image.DecompressionBombError:
        raise JaxRetrievalError(f"the image has too many pixels; send at most {max_pixels}")
    width, height = image.size
    if width * height > max_pixels:
        raise JaxRetrievalError(
            f"the image is {width}x{height} pixels; send at most {max_pixels} pixels")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise JaxRetrievalError(f"the image is truncated or corrupt ({err}); send it whole")
    return upright(image)
