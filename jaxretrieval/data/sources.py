"""Image sources: `digits`, `tfds:NAME`, `folder:PATH` and `video:PATH` (the sampled frames
of videos, jaxretrieval.video.source), behind one ImageDataset.

`DATASETS` maps the kind of a reference (the part before ":") to its loader; the config's
`dataset` is checked against it (`parse_reference`), so adding a kind of dataset touches
this file alone.

Every item has a label index, a string key (a folder image: its path relative to the root;
a TFDS or digits example: `split/index`) and a source reference from which its image can be
read again (`read_source`): an absolute file path, `tfds:NAME/split/index`, or a video
frame's `/path/video.mp4@SECONDS`. A dataset's
`source_roots` say where its sources may lie (the folder, or `tfds:NAME`); thumbnails are
read only from there (`resolve_within_roots`).
"""

import dataclasses
import functools
import logging
import os
import threading
from typing import Callable

import numpy as np
from PIL import Image

from jaxretrieval.data.images import InputSpec, read_image_file, to_model_input
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index.keys import check_keys

logger = logging.getLogger(__name__)

DIGITS_TFDS_NAME = "sklearn_digits"
DIGITS_TFDS_VERSION = "1.0.0"
TFDS_REF_PREFIX = "tfds:"


def decoded_input_spec(config) -> InputSpec:
    """How a dataset's loaders turn its images into model inputs. Face alignment is left out:
    with `model.align_faces`, `load_dataset` replaces the images with face chips cut from
    the originals (`data.face_chips`)."""
    return dataclasses.replace(InputSpec.of(config), align_faces=False)


@dataclasses.dataclass
class ImageDataset:
    """A labelled image set read by index; images come out as the model's uint8 input."""

    name: str
    labels: np.ndarray  # int64 [n], 0 .. num_classes-1
    keys: list  # str [n]
    sources: list  # str [n]
    class_names: list  # str [num_classes], index = label
    image_size: int
    channels: int
    read_one: Callable[[int], np.ndarray]  # index -> uint8 [size, size, channels]
    # With config.model.align_faces: the images aligned as whole images, no face found in them.
    faces_not_found: int | None = None
    # Where its sources lie: absolute folders and `tfds:NAME` entries (see `resolve_within_roots`).
    source_roots: tuple = ()
    # Entries for the embedding export's export.json (a video dataset's sampling and the
    # videos it skipped).
    export_metadata: dict = dataclasses.field(default_factory=dict)
    _cache: np.ndarray = None  # filled as images are first read; see cache_in_memory
    _cached: np.ndarray = None  # bool [n]: which rows of _cache are decoded

    def __len__(self):
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def images(self, indices) -> np.ndarray:
        """uint8 [len(indices), size, size, channels]."""
        indices = np.asarray(indices, np.int64)
        if self._cache is None:
            return self._decode(indices)
        self._fill_cache(indices)
        return self._cache[indices]

    def _fill_cache(self, indices) -> None:
        # Decoded straight into the cache: no second full-size array at the peak.
        for index in np.unique(indices[~self._cached[indices]]):
            self._cache[index] = self.read_one(int(index))
            self._cached[index] = True

    def _decode(self, indices) -> np.ndarray:
        out = np.empty((len(indices), self.image_size, self.image_size, self.channels), np.uint8)
        for i, index in enumerate(indices):
            out[i] = self.read_one(int(index))
        return out

    def cache_in_memory(self, max_bytes: int, *, decode_now: bool = True) -> bool:
        """Keeps every image once decoded, if all of them fit in `max_bytes`.

        `decode_now` decodes them all at once (a corrupt file is reported before training
        starts); otherwise each is decoded when first read, so a process of a multi-process
        run that reads only its share of each batch decodes only that.
        """
        size = len(self) * self.image_size * self.image_size * self.channels
        if self._cache is None and size <= max_bytes:
            self._cache = np.empty((len(self), self.image_size, self.image_size, self.channels),
                                   np.uint8)
            self._cached = np.zeros(len(self), bool)
            if decode_now:
                self._fill_cache(np.arange(len(self)))
        return self._cache is not None


def load_dataset(config, *, decode_now: bool = True) -> ImageDataset:
    """The dataset named by `config.dataset`, its images sized per the config (decoded now
    into memory when they fit `config.cache_max_bytes`, see `cache_in_memory`); with
    `config.model.align_faces`, its images are the aligned face chips (`face_chips`)."""
    source, argument = parse_reference(config.dataset)
    dataset = source.load(argument, config)
    if len(dataset) == 0:
        raise JaxRetrievalError(f"dataset {config.dataset!r} holds no images")
    if config.model.align_faces:
        from jaxretrieval.data.face_chips import align_dataset

        # Chips are cut from the original images: a face in a resized input is too small.
        align_dataset(dataset, config,
                      lambda i: read_source(dataset.sources[i], _tfds_data_dir(config)))
    dataset.cache_in_memory(config.cache_max_bytes, decode_now=decode_now)
    return dataset


# ---------------------------------------------------------------------------------------------
# TFDS, and digits written once as a TFDS dataset.

def _tfds_data_dir(config):
    return config.data_dir or None  # None: TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)


def prepare_digits_tfds(data_dir) -> None:
    """Writes scikit-learn's bundled 8x8 digits as a TFDS array_record dataset, once, offline."""
    import tensorflow_datasets as tfds
    from sklearn.datasets import load_digits

    builder_dir = os.path.join(data_dir or tfds.core.constants.DATA_DIR, DIGITS_TFDS_NAME,
                               DIGITS_TFDS_VERSION)
    if os.path.isfile(os.path.join(builder_dir, "dataset_info.json")):
        return
    digits = load_digits()
    # sklearn's pixels are 0..16; scale to the usual 0..255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 1)),
        "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
    })
    examples = [(i, {"image": image, "label": int(label)})
                for i, (image, label) in enumerate(zip(images, digits.target))]
    # TFDS writes into an `incomplete.*` folder and renames it when done, so a killed
    # preparation never leaves a half-written dataset behind.
    tfds.dataset_builders.store_as_tfds_dataset(
        name=DIGITS_TFDS_NAME, version=DIGITS_TFDS_VERSION, features=features,
        split_datasets={"train": examples}, data_dir=data_dir,
        description="scikit-learn's bundled handwritten digits (8x8, 1797 images)",
        file_format="array_record", disable_shuffling=True)  # keep sklearn's order: key = row


def _digits_dataset(argument, config) -> ImageDataset:
    del argument  # `digits` takes none
    data_dir = _tfds_data_dir(config)
    prepare_digits_tfds(data_dir)
    return _tfds_dataset(DIGITS_TFDS_NAME, config, display_name="digits")


def _tfds_dataset(tfds_name, config, display_name=None) -> ImageDataset:
    import tensorflow_datasets as tfds

    data_dir = _tfds_data_dir(config)
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as err:  # TFDS raises several types for an unknown name
        raise JaxRetrievalError(f"unknown TFDS dataset {tfds_name!r} ({err})") from None
    if not os.path.isfile(os.path.join(str(builder.data_dir), "dataset_info.json")):
        if not config.download:
            # Without a network TFDS would retry its downloads for minutes: stop at once.
            root = str(builder.data_dir_root)
            raise JaxRetrievalError(
                f"TFDS dataset {tfds_name!r} is not prepared in {root}: prepare it with "
                f"`tfds build {tfds_name} --data_dir {root}` (add --manual_dir DIR for files "
                "you downloaded by hand), or pass --config.download=true to download and "
                "prepare it now, or --config.data_dir=DIR where it is prepared")
        logger.info("downloading and preparing TFDS dataset %s (needs internet)", tfds_name)
        builder.download_and_prepare(file_format="array_record")
    features = builder.info.features
    if config.label_key not in features or "image" not in features:
        raise JaxRetrievalError(
            f"TFDS dataset {tfds_name!r} has features {sorted(features.keys())}; it needs "
            f"'image' and the label feature named by config.label_key={config.label_key!r}")
    label_feature = features[config.label_key]
    names = list(getattr(label_feature, "names", []) or [])

    split_names = sorted(builder.info.splits.keys())
    split_sources = {s: tfds.data_source(tfds_name, split=s, data_dir=data_dir, download=False)
                     for s in split_names}
    keys, sources, labels, locations = [], [], [], []
    for split_name in split_names:
        source = split_sources[split_name]
        for index in range(len(source)):
            keys.append(f"{split_name}/{index}")
            sources.append(f"{TFDS_REF_PREFIX}{tfds_name}/{split_name}/{index}")
            locations.append((split_name, index))
        labels.append(_tfds_labels(tfds_name, split_name, data_dir, config.label_key))
    labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    num_classes = len(names) or int(labels.max()) + 1
    names = names or [str(i) for i in range(num_classes)]

    spec = decoded_input_spec(config)

    def read_one(i):
        split_name, index = locations[i]
        return to_model_input(split_sources[split_name][index]["image"], spec)

    return ImageDataset(display_name or f"tfds:{tfds_name}", labels, keys, sources, names,
                        config.image_size, config.channels, read_one,
                        source_roots=(f"{TFDS_REF_PREFIX}{tfds_name}",))


def _tfds_labels(tfds_name, split_name, data_dir, label_key) -> np.ndarray:
    import tensorflow_datasets as tfds

    # Labels alone: skip image decoding, or listing the labels would decode every image.
    source = tfds.data_source(tfds_name, split=split_name, data_dir=data_dir, download=False,
                              decoders={"image": tfds.decode.SkipDecoding()})
    labels = np.empty(len(source), np.int64)
    for start in range(0, len(source), 1024):
        stop = min(start + 1024, len(source))
        for offset, example in enumerate(source.__getitems__(range(start, stop))):
            labels[start + offset] = int(example[label_key])
    return labels


# ---------------------------------------------------------------------------------------------
# A folder of class sub-folders.

def _image_extensions():
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _folder_dataset(root, config) -> ImageDataset:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise JaxRetrievalError(
            f"dataset folder {root!r} not found: pass folder:PATH with one sub-folder per class")
    extensions = _image_extensions()

    def image_files(folder):
        return sorted(f for f in os.listdir(folder)
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions
                      and os.path.isfile(os.path.join(folder, f)))

    class_names = sorted(entry.name for entry in os.scandir(root)
                         if entry.is_dir() and not entry.name.startswith("."))
    if not class_names:
        files = image_files(root)
        if files:
            # A flat folder of images (a gallery to embed, not a training set): one class.
            return _image_files_dataset(root, [""], [files], config)
        raise JaxRetrievalError(
            f"dataset folder {root!r} has no class sub-folders and no images: put each "
            "class's images in a sub-folder named after the class (or, for a gallery to "
            "embed, the images themselves)")
    files_per_class = []
    for class_name in class_names:
        class_dir = os.path.join(root, class_name)
        files = image_files(class_dir)
        if not files:
            raise JaxRetrievalError(
                f"class folder {class_dir!r} holds no image files; add images or remove it "
                "(the label index of a class is its position in sorted folder order)")
        files_per_class.append(files)
    return _image_files_dataset(root, class_names, files_per_class, config)


def _image_files_dataset(root, class_names, files_per_class, config) -> ImageDataset:
    """Keys are paths relative to `root`; a class is a sub-folder ("" for the root)."""
    keys, sources, labels = [], [], []
    for label, (class_name, files) in enumerate(zip(class_names, files_per_class)):
        for file_name in files:
            keys.append(f"{class_name}/{file_name}" if class_name else file_name)
            sources.append(os.path.join(root, class_name, file_name))
            labels.append(label)

    try:
        check_keys(keys)
    except JaxRetrievalError as err:
        # Refused here, before any image is embedded, rather than when the index is built.
        raise JaxRetrievalError(f"{err}. A folder image's key is its path relative to "
                                f"{root!r}: rename that file or folder") from None
    spec = decoded_input_spec(config)

    def read_one(i):
        return to_model_input(read_image_file(sources[i]), spec)

    return ImageDataset(f"folder:{root}", np.asarray(labels, np.int64), keys, sources,
                        [name or os.path.basename(root) for name in class_names],
                        config.image_size, config.channels, read_one, source_roots=(root,))


def _video_dataset(argument, config) -> ImageDataset:
    from jaxretrieval.video.source import load_video_dataset

    return load_video_dataset(argument, config, ImageDataset, decoded_input_spec(config))


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """A kind of dataset reference: `KIND` alone, or `KIND:ARGUMENT` (a name, a path)."""

    load: Callable  # (argument, config) -> ImageDataset; argument is "" for a bare kind
    argument: str = ""  # what follows "KIND:", as the usage text names it; "" for none


# The kinds `config.dataset` may name, by the part before the first ":".
DATASETS = {
    "digits": DatasetSource(_digits_dataset),
    "tfds": DatasetSource(_tfds_dataset, "NAME"),
    "folder": DatasetSource(_folder_dataset, "PATH"),
    "video": DatasetSource(_video_dataset, "PATH"),
}


def parse_reference(reference: str) -> tuple[DatasetSource, str]:
    """(source, argument) of a dataset reference such as `digits` or `tfds:NAME`.

    Raises JaxRetrievalError listing the kinds of `DATASETS` when it names none of them, or
    gives one an argument it takes none of (or none where it needs one).
    """
    kind, _, argument = reference.partition(":")
    source = DATASETS.get(kind)
    if source is None or bool(argument) != bool(source.argument):
        usages = [f"{name}:{entry.argument}" if entry.argument else name
                  for name, entry in DATASETS.items()]
        raise JaxRetrievalError(f"bad config: dataset={reference!r}; use "
                                f"{', '.join(usages[:-1])} or {usages[-1]}")
    return source, argument


# The first import of tensorflow_datasets and the opening of a data source are not safe from
# several threads at once (a service's first thumbnail requests arrive together and could
# hang there), and opening one costs milliseconds per read: one lock, and open sources kept.
# Reads hold the lock too: a source's record reader is not documented as thread-safe, and a
# thumbnail's read is a fraction of its decoding and resizing, which run outside it.
TFDS_READ_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def tfds_data_source(name: str, split: str, data_dir: str | None):
    """The random-access source of a prepared TFDS split, opened once per process (call it
    holding TFDS_READ_LOCK)."""
    import tensorflow_datasets as tfds

    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def read_source(reference: str, data_dir=None) -> Image.Image:
    """Reads an item's original image again from its source reference (for thumbnails)."""
    if reference.startswith(TFDS_REF_PREFIX):
        tfds_name, split_name, index = reference[len(TFDS_REF_PREFIX):].rsplit("/", 2)
        with TFDS_READ_LOCK:
            source = tfds_data_source(tfds_name, split_name, data_dir or None)
            array = np.asarray(source[int(index)]["image"])
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    frame = video_frame_of(reference)
    if frame is not None:
        from jaxretrieval.video.decode import read_frame_at

        return read_frame_at(*frame)
    return read_image_file(reference)


def video_frame_of(reference: str):
    """(video path, seconds) of a video frame's source `path.mp4@SECONDS`, else None (a
    file of that very name is a file)."""
    from jaxretrieval.video.decode import is_video_path, parse_frame_key

    frame = parse_frame_key(reference)
    if frame is None or not is_video_path(frame[0]) or os.path.isfile(reference):
        return None
    return frame


def roots_of_reference(reference: str) -> list:
    """The source roots of the dataset `reference` names, for an index recorded before
    `source_roots` were: a folder given as an absolute path, a TFDS name, or digits."""
    kind, _, argument = (reference or "").partition(":")
    if kind == "folder" and os.path.isabs(os.path.expanduser(argument)):
        return [os.path.abspath(os.path.expanduser(argument))]
    if kind == "tfds" and argument:
        return [f"{TFDS_REF_PREFIX}{argument}"]
    if kind == "digits":
        return [f"{TFDS_REF_PREFIX}{DIGITS_TFDS_NAME}"]
    return []


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    """A source checked against the roots, with what it is decided once: `reference` is a
    `tfds:` reference, or the real path of an image file, or for a video's frame
    `frame_key(real video path, seconds)` with `frame` = (real video path, seconds)."""

    reference: str
    frame: tuple | None = None


def resolve_within_roots(reference: str, roots) -> ResolvedSource | None:
    """What to read for the source `reference` when it lies under one of `roots`, else None:
    a `tfds:NAME/split/index` of a `tfds:NAME` root as it is, or an absolute file (or a
    video's frame) inside a root folder at the real path the check saw, with symbolic links
    and `..` resolved. Reading that (`read_resolved`), not `reference`, keeps a link changed
    after the check from leading the read outside the roots."""
    if reference.startswith(TFDS_REF_PREFIX):
        parts = reference[len(TFDS_REF_PREFIX):].rsplit("/", 2)  # as read_source splits it
        inside = (len(parts) == 3 and f"{TFDS_REF_PREFIX}{parts[0]}" in roots
                  and bool(parts[1]) and parts[2].isdigit() and parts[2].isascii())
        return ResolvedSource(reference) if inside else None
    if not os.path.isabs(reference) or "\0" in reference:
        return None
    frame = video_frame_of(reference)
    if frame is not None:  # a video's frame: the video file is what is checked, and read
        from jaxretrieval.video.decode import frame_key

        video = resolve_within_roots(frame[0], roots)
        if video is None:
            return None
        return ResolvedSource(frame_key(video.reference, frame[1]),
                              (video.reference, frame[1]))
    path = os.path.realpath(reference)
    for root in roots:
        if root.startswith(TFDS_REF_PREFIX) or not os.path.isabs(root):
            continue
        root = os.path.realpath(root)
        if os.path.commonpath([root, path]) == root and path != root:
            return ResolvedSource(path)
    return None


def read_resolved(source: ResolvedSource, data_dir=None) -> Image.Image:
    """Reads what `resolve_within_roots` checked, as it decided: a video's frame from its
    video, anything else as `read_source` reads it."""
    if source.frame is not None:
        from jaxretrieval.video.decode import read_frame_at

        return read_frame_at(*source.frame)
    if source.reference.startswith(TFDS_REF_PREFIX):
        return read_source(source.reference, data_dir)
    return read_image_file(source.reference)
