"""Face detection and alignment to dlib's face chip, with dlib (the optional `[faces]` extra).

Each image's largest face is found by dlib's HOG frontal face detector, its five landmarks
(eye corners and the base of the nose) by dlib's 5-point shape predictor, and the face is
cut out rotated upright and scaled to a `size` x `size` chip with dlib's default padding of
a quarter of the face on each side: the input `dlib_face_recognition_resnet_model_v1` was
trained on. An image with no face found is aligned as if its whole area were the face box,
so every image gives a chip and the results keep the input's order.

The model files come from the `face-recognition-models` package; only its 5-point landmark
model is used (the 68-point model in the same package carries a non-commercial licence).
"""

import functools
import importlib.util
import os
import threading

import numpy as np
from PIL import Image

from jaxretrieval.errors import JaxRetrievalError

CHIP_SIZE = 150
CHIP_PADDING = 0.25  # dlib's default: the chip shows a quarter face width around the face
SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
FACE_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
INSTALL_HINT = 'install the face extra: pip install -e ".[faces]"'
# dlib's object_detector keeps its image scanner as mutable state that every call loads
# its image into (`mutable image_scanner_type scanner` in dlib/image_processing/
# object_detector.h), so one detector must not run in two threads at once (the service
# aligns uploads in its thread pool). The shape predictor shares the lock: it takes a
# millisecond, and its thread safety is not documented.
DETECTOR_LOCK = threading.Lock()


def import_dlib():
    """The dlib module, or an error that says how to install it."""
    try:
        import dlib
    except ImportError:
        raise JaxRetrievalError(f"face alignment needs dlib; {INSTALL_HINT}") from None
    return dlib


def face_model_file(name: str) -> str:
    """The path of a model file of the installed `face-recognition-models` package.

    Found without importing the package: its __init__ needs pkg_resources, which recent
    setuptools no longer installs.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise JaxRetrievalError(
            f"the face model file {name} comes with face-recognition-models; {INSTALL_HINT}")
    path = os.path.join(spec.submodule_search_locations[0], "models", name)
    if not os.path.isfile(path):
        raise JaxRetrievalError(
            f"{path} is missing from the installed face-recognition-models; reinstall it "
            "(pip install --force-reinstall face-recognition-models)")
    return path


@functools.lru_cache(maxsize=None)
def face_models():
    """(detector, shape predictor), loaded once per process: the predictor is 9 MB to read."""
    dlib = import_dlib()
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(face_model_file(SHAPE_PREDICTOR_FILE)))


def as_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3], C-contiguous, from a grayscale, RGB or RGBA array or a PIL image."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")  # also resolves palette images, such as most GIFs
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise JaxRetrievalError(f"face alignment takes uint8 images, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
        raise JaxRetrievalError(
            f"image array has shape {array.shape}; pass HxW, HxWx1, HxWx3 or HxWx4")
    return np.ascontiguousarray(array[..., :3])


def largest(rectangles):
    """The largest detection by area; the first of equals, so the choice is deterministic."""
    return max(rectangles, key=lambda r: r.width() * r.height(), default=None)


def align_face(image, size: int = CHIP_SIZE, upsample: int = 0) -> tuple:
    """(chip uint8 [size, size, 3], found): one image's largest face, aligned.

    `upsample` doubles the image that many times before detecting, for faces smaller than
    the detector's 80x80 window, at four times the cost each.
    """
    dlib = import_dlib()
    detector, predictor = face_models()
    rgb = as_rgb(image)
    with DETECTOR_LOCK:
        box = largest(detector(rgb, upsample))
        found = box is not None
        if not found:
            box = dlib.rectangle(0, 0, rgb.shape[1] - 1, rgb.shape[0] - 1)
        landmarks = predictor(rgb, box)
    chip = dlib.get_face_chip(rgb, landmarks, size=size, padding=CHIP_PADDING)
    return np.asarray(chip, np.uint8), found


def align_faces(images, size: int = CHIP_SIZE, upsample: int = 0) -> tuple:
    """(chips uint8 [n, size, size, 3], found bool [n]) for a sequence of images.

    Images may differ in size; grayscale ones become RGB. See `align_face`.
    """
    chips = np.empty((len(images), size, size, 3), np.uint8)
    found = np.zeros(len(images), bool)
    for i, image in enumerate(images):
        chips[i], found[i] = align_face(image, size, upsample)
    return chips, found
