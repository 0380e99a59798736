"""Encoded image bytes -> the model's uint8 input, fast: JPEGs through libjpeg-turbo
(simplejpeg) at a reduced DCT scale, everything else through Pillow as `images` does.

A large photo needs no full-size decode to become a 224x224 input: libjpeg-turbo can
decode straight to 1/2, 1/4 or 1/8 of the size with its vectorised reduced inverse DCTs, so
the JPEG is decoded at the smallest of those scales whose both sides are still at least the
side the input convention resizes to, and then resized by `to_model_input` as any image is.
(The eighths between are left out: libjpeg-turbo has no vectorised code for them, and a
5/8-scale decode takes longer than a full one.) At full scale simplejpeg's pixels are
Pillow's (both are libjpeg-turbo's accurate integer DCT with fancy upsampling); at a reduced
scale they differ from a full decode resized by Pillow by the rounding of the scaled DCT
(tests/test_grain_input.py states and checks the bound).

What simplejpeg does not decode the way Pillow would (CMYK JPEGs, face alignment, any other
format) takes Pillow's path, so its pixels are exactly the in-process loader's.
"""

import io
import math
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxretrieval.data.images import InputSpec, to_model_input, upright
from jaxretrieval.errors import JaxRetrievalError

try:  # optional: the `grain` requirements bring it; Pillow decodes without it
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where simplejpeg is not installed
    simplejpeg = None

# The EXIF orientation tag, and the transposition that turns each value upright (as
# PIL.ImageOps.exif_transpose does).
ORIENTATION_TAG = 0x0112
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
JPEG_START = b"\xff\xd8\xff"
# The colour spaces (simplejpeg.decode_jpeg_header's names) that simplejpeg decodes to
# Pillow's pixels; CMYK and YCCK JPEGs go to Pillow.
FAST_COLOURSPACES = ("YCbCr", "RGB", "Gray")
# An EXIF block's start, looked for in the first bytes of a JPEG (APP1 comes first there).
EXIF_MARK = b"Exif\x00\x00"
EXIF_SEARCH_BYTES = 1 << 16


def fast_jpeg_available() -> bool:
    return simplejpeg is not None


def decoded_side(spec: InputSpec) -> int:
    """The side both of an image's sides must keep for `to_model_input` to resize it as
    from the full image: image_size for a whole-image resize, image_size / crop_fraction
    for a centre crop (its shorter side is resized to that)."""
    return math.ceil(spec.image_size / spec.crop_fraction)


def reduction(size, side: int) -> int:
    """The largest of 1, 2, 4 and 8 that leaves both sides of an image of `size` at least
    `side` pixels once divided by it (rounded up, as libjpeg-turbo does)."""
    factor = 1
    while factor < 8 and -(-min(size) // (2 * factor)) >= side:
        factor *= 2
    return factor


def decode_model_input(data: bytes, spec: InputSpec, *, name: str,
                       reduced_dct: bool = True) -> np.ndarray:
    """uint8 [image_size, image_size, channels] from an encoded image, turned upright by
    its EXIF orientation; `name` (a path, a record) is what a decoding error names.

    With `reduced_dct`, a JPEG at least twice the input's size is decoded at 1/2, 1/4 or
    1/8 scale (`reduction`), its sides still at least `decoded_side(spec)`.
    """
    try:
        if simplejpeg is not None and data[:3] == JPEG_START and not spec.align_faces:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in FAST_COLOURSPACES:
                factor = reduction((width, height), decoded_side(spec)) if reduced_dct else 1
                return _fast_jpeg(data, spec, colorspace == "Gray", -(-width // factor),
                                  -(-height // factor))
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so a truncated file fails here
        decoded = upright(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise JaxRetrievalError(
            f"cannot read image {name!r} ({err}); replace or remove the file") from None
    return to_model_input(decoded, spec)


def _fast_jpeg(data: bytes, spec: InputSpec, grey: bool, min_width: int,
               min_height: int) -> np.ndarray:
    # libjpeg-turbo's output at scale 1/factor is ceil(side / factor) pixels a side, the
    # smallest of its scales that keeps both minimums.
    pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if grey else "RGBX",
                                    min_height=min_height, min_width=min_width)
    height, width = pixels.shape[:2]
    if grey:
        decoded = Image.fromarray(pixels[..., 0])
    else:
        # RGBX is Pillow's own layout for RGB: the decoded buffer is used as it is.
        decoded = Image.frombuffer("RGBX", (width, height), pixels, "raw", "RGBX", 0, 1)
    orientation = _orientation(data)
    if orientation in UPRIGHT:
        decoded = decoded.transpose(UPRIGHT[orientation])
    size = spec.image_size
    if decoded.mode == "RGBX" and spec.channels == 3 and spec.crop_fraction == 1:
        # Resized before dropping the padding byte: the same R, G and B as resizing the
        # RGB image, which `to_model_input` would first copy out at full size.
        decoded = decoded.resize((size, size), Image.BILINEAR) if decoded.size != (
            size, size) else decoded
    if decoded.mode == "RGBX":
        decoded = decoded.convert("RGB")
    return to_model_input(decoded, spec)


def _orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG (1, upright, when it has no EXIF block: most photos
    from the web and datasets have none, and then nothing else is parsed)."""
    if data.find(EXIF_MARK, 0, EXIF_SEARCH_BYTES) < 0:
        return 1
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.getexif().get(ORIENTATION_TAG, 1))
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        return 1  # a damaged EXIF block is no reason to refuse the pixels (as `upright`)
