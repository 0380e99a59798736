"""A dataset's aligned face chips, made once from its original images and kept on disk.

With `config.model.align_faces`, `load_dataset` hands each dataset to `align_dataset`: every
item's original image (not the resized model input) is aligned by `faces.align_face`, and
the dataset then reads its chips instead. Detection costs tens of milliseconds an image, so
the chips of a dataset are cached in `~/.cache/jaxretrieval/face_chips/` (under
$XDG_CACHE_HOME when set), one `.npy` of chips and one `.json` beside it, named by a digest
of everything that decides them: the dataset reference, each item's key with its file's
size and modification time, the chip side, dlib's version and the landmark model file. A
changed, added or removed image, or another dlib, makes another name; nothing is stale.

The `.json` is written after the `.npy` and is what marks an entry complete, so a run
killed mid-write leaves no entry a later run would read. Every process of a multi-process
run aligns (or reads) the whole dataset: simple, and the same chips everywhere.
"""

import hashlib
import json
import logging
import os

import numpy as np

from jaxretrieval.data import faces
from jaxretrieval.fileio import atomic_file, cache_home, write_json_atomically

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the way chips are made changes without dlib's version changing


def cache_dir() -> str:
    """`$XDG_CACHE_HOME/jaxretrieval/face_chips`, by default `~/.cache/jaxretrieval/...`."""
    return os.path.join(cache_home(), "face_chips")


def source_fingerprint(source: str):
    """What identifies an item's image: a file's size and modification time (nanoseconds),
    else the reference itself (a TFDS example, fixed by the dataset's version)."""
    try:
        stat = os.stat(source)
    except (OSError, ValueError):
        return source
    return [stat.st_size, stat.st_mtime_ns]


def chips_digest(reference: str, keys, sources, size: int) -> str:
    """The cache name of the chips of these items at side `size`."""
    dlib = faces.import_dlib()
    predictor = faces.face_model_file(faces.SHAPE_PREDICTOR_FILE)
    hasher = hashlib.sha256()
    hasher.update(json.dumps({
        "version": CACHE_VERSION, "dataset": reference, "size": size,
        "padding": faces.CHIP_PADDING, "dlib": dlib.__version__,
        "landmarks": [os.path.basename(predictor), os.path.getsize(predictor)],
    }, sort_keys=True).encode())
    for key, source in zip(keys, sources):
        hasher.update(json.dumps([key, source_fingerprint(source)]).encode())
    return hasher.hexdigest()[:32]


def read_cached(path: str, count: int, size: int):
    """(chips, found) of a complete cache entry, or None when there is none or it is unusable
    (then it is made again: a cache is never worth failing a run for)."""
    meta_path = path + ".json"
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        chips = np.load(path + ".npy", mmap_mode="r")
        found = np.ones(count, bool)
        found[np.asarray(meta["not_found"], np.int64)] = False
    except (OSError, ValueError, KeyError, IndexError) as err:
        logger.warning("face chip cache %s is unreadable (%s); aligning again", path, err)
        return None
    if chips.shape != (count, size, size, 3) or chips.dtype != np.uint8:
        logger.warning("face chip cache %s holds %s %s chips, expected %d of %dx%d; aligning "
                       "again", path, chips.dtype, chips.shape, count, size, size)
        return None
    return chips, found


def make_chips(read_original, count: int, size: int, path: str):
    """Aligns the `count` images `read_original(i)` returns and caches the chips at `path`."""
    logger.info("aligning the faces of %d images (kept in %s.npy for later runs)", count, path)
    chips = np.empty((count, size, size, 3), np.uint8)
    found = np.zeros(count, bool)
    for i in range(count):
        chips[i], found[i] = faces.align_face(read_original(i), size)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path + ".npy", "wb") as f:
            np.save(f, chips)
        write_json_atomically(path + ".json", {
            "count": count, "size": size, "not_found": np.flatnonzero(~found).tolist()})
    except OSError as err:  # a cache is never worth failing a run for
        logger.warning("face chips not cached (%s): the next run aligns again", err)
    missing = count - int(np.count_nonzero(found))
    if missing:
        logger.warning("%d of %d images: no face found; aligned as whole images", missing, count)
    return chips, found


def dataset_chips(reference: str, keys, sources, read_original, size: int):
    """(chips uint8 [n, size, size, 3], found bool [n]) of a dataset's items, from the cache
    when the same images were aligned before, else aligned now and cached.

    `read_original(i)` gives item i's original image (a PIL image or an array).
    """
    path = os.path.join(cache_dir(), chips_digest(reference, keys, sources, size))
    cached = read_cached(path, len(keys), size)
    if cached is not None:
        logger.info("face chips of %d images read from %s.npy (%d with no face found)",
                    len(keys), path, np.count_nonzero(~cached[1]))
        return cached
    return make_chips(read_original, len(keys), size, path)


def align_dataset(dataset, config, read_original) -> None:
    """Makes `dataset` read the aligned chips of its images (side `config.image_size`) and
    sets its `faces_not_found`, the count of images aligned as whole images."""
    chips, found = dataset_chips(dataset.name, dataset.keys, dataset.sources, read_original,
                                 config.image_size)
    dataset.read_one = lambda i: np.array(chips[i])
    dataset.faces_not_found = int(np.count_nonzero(~found))
