"""The serving-time object: an Embedder and the index (flat or sharded) it was built with.

Everything a caller does with a trained workdir goes through a Retriever: embedding, search,
matching, live changes to the gallery and the thumbnails of its items. The HTTP service is
one such caller; it holds no other handle on the model or the index.
"""

import dataclasses
import logging
import os
import threading

import numpy as np
from PIL import Image

from jaxretrieval.data.images import (InputSpec, decode_image_bytes, eight_bit, in_mode,
                                      load_images, to_model_input)
from jaxretrieval.data.sources import read_resolved, resolve_within_roots, roots_of_reference
from jaxretrieval.embed import Embedder
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.explain import (Explainer, Explanation, check_explainable, check_stage,
                                  explanation, stage_shapes)
from jaxretrieval.index import Index, ShardedIndex, open_index, stored_key
from jaxretrieval.workdir import Workdir

THUMBNAIL_SIDE = 160
# Thumbnails smaller than this on their longer side (8x8 digits) are scaled up by a whole
# factor, with nearest-neighbour pixels, so that they are visible and stay sharp.
THUMBNAIL_MIN_SIDE = 64
# One answer for every item without a thumbnail, whatever the reason, so that a thumbnail
# request never tells whether a path exists on the host.
NO_THUMBNAIL = "no thumbnail for this item"

logger = logging.getLogger(__name__)


class UnknownItemError(JaxRetrievalError):
    """A key names no item in the gallery."""


class NoThumbnailError(JaxRetrievalError):
    """An item whose image cannot be shown: no source, a source outside the dataset's roots,
    or a file that is missing or unreadable. Its message is NO_THUMBNAIL, always."""


@dataclasses.dataclass(frozen=True)
class Match:
    """The similarity of two images and, when a threshold is known, whether they match."""

    similarity: float
    same: bool | None
    threshold: float | None


class Retriever:
    """Embeds query images, searches the gallery index and keeps the gallery up to date.

        r = Retriever.load("runs/default")
        keys, scores = r.search(images, k=10)   # images: HxWxC uint8 arrays or file paths

    Images are made into the model's input as the run's dataset was (for a face model,
    aligned to their face chip), so any photo can be given as it is.

    Searches may run in many threads at once, beside one thread changing the gallery.
    Errors a caller can fix raise JaxRetrievalError (UnknownItemError for a key that is
    not in the gallery).
    """

    # Every call runs here, none waits on another process (service.backend.ServiceBackend).
    in_process = True

    def __init__(self, embedder: Embedder, index: Index | ShardedIndex, *,
                 thumbnail_roots=()):
        """`thumbnail_roots`: folders besides the dataset's (see `thumbnail`) whose images
        items' sources may name."""
        if embedder.embedding_dim != index.embedding_dim:
            raise JaxRetrievalError(
                f"the model embeds to {embedder.embedding_dim} dimensions, the index holds "
                f"{index.embedding_dim}: rebuild the index with `python -m train --eval_only`")
        self.embedder = embedder
        self.index = index
        self._thumbnail_roots = tuple(os.path.abspath(os.fspath(root))
                                      for root in thumbnail_roots)
        self._stages = None  # the backbone's stages, found on the first `explain`
        self._explainers = {}  # stage name -> Explainer, compiled on its first use
        self._explainer_lock = threading.Lock()

    @classmethod
    def load(cls, workdir: str, *, writable: bool = False, thumbnail_roots=()) -> "Retriever":
        """The latest checkpoint and `DIR/index/` (flat or sharded); refuses an index built
        by another model.

        `writable=True` opens the index for live updates (`upsert_images`,
        `upsert_embeddings`, `delete`), each written to the index's log before it returns,
        so that the next `load` sees it; one writer per workdir at a time.
        """
        embedder = Embedder.from_workdir(workdir)
        index = open_index(Workdir(workdir).index, writable=writable, expected={
            "embedding_dim": embedder.embedding_dim,
            "model_config_hash": embedder.model_config_hash,
            "checkpoint_step": embedder.checkpoint_step,
        })
        return cls(embedder, index, thumbnail_roots=thumbnail_roots)

    def close(self) -> None:
        """Closes the index: a writable one stops taking changes and frees the workdir for
        the next writer."""
        self.index.close()

    # ------------------------------------------------------------------ facts

    @property
    def count(self) -> int:
        """The number of items in the gallery."""
        return self.index.count

    @property
    def embedding_dim(self) -> int:
        """The length of every embedding."""
        return self.index.embedding_dim

    @property
    def writable(self) -> bool:
        """True when changes are logged durably (`load(..., writable=True)`)."""
        return self.index.writable

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key in self.index

    def resolve(self, key: str) -> str | None:
        """The gallery key that `key` names, or None: `key` itself, or the stored key of a
        form `jaxretrieval.index.shown_key` showed (lone surrogates written as `\\udXXX`), for
        an item stored before the key rules."""
        if key in self:
            return key
        stored = stored_key(key) if isinstance(key, str) else None
        return stored if stored is not None and stored in self else None

    @property
    def match_threshold(self) -> float | None:
        """The calibrated threshold: at the target precision (default 0.99) if one reached
        it, else the best-F1 one; None for an index without calibration."""
        thresholds = self.index.manifest.get("match_thresholds") or {}
        value = thresholds.get("at_target_precision")
        return value if value is not None else thresholds.get("best_f1")

    # ------------------------------------------------------------------ embedding

    def warm_up(self, max_batch: int | None = None) -> None:
        """Compiles the embedding programs ahead of the first query."""
        self.embedder.warm_up(max_batch)

    def decode_image(self, data: bytes, *, max_pixels: int) -> np.ndarray:
        """An encoded image (PNG, JPEG, ...) as the model's uint8 [size, size, channels] input.

        With `config.model.align_faces` it is the aligned chip of the image's face, as for
        `embed`. Raises JaxRetrievalError for bytes that are not an image, a truncated
        image, or one of more than `max_pixels` pixels (checked before the pixels are
        decoded).
        """
        image = decode_image_bytes(data, max_pixels=max_pixels)
        return to_model_input(image, InputSpec.of(self.embedder.config))

    def embed(self, images) -> np.ndarray:
        """L2-normalised float32 [n, d] embeddings of HxWxC uint8 arrays or image paths."""
        return self.embedder.embed(images)

    def embed_uint8(self, images: np.ndarray) -> np.ndarray:
        """As `embed`, for a uint8 [n, size, size, channels] batch already in the model's
        input shape (see `decode_image`), without converting image by image."""
        return self.embedder.embed_uint8(images)

    # ------------------------------------------------------------------ search and match

    def search(self, images, k: int = 10, *, threshold: float | None = None,
               filter: dict | None = None, with_metadata: bool = False):
        """(keys, scores): per query image, up to k gallery keys and their scores, best first.

        `filter` keeps only items whose metadata passes it, e.g. `{"label": "cat", "year":
        {"in": [2023, 2024]}}` (docs/index.md#metadata-and-filters): the results are the
        best k of those. With `with_metadata=True` it returns (keys, scores, metadata),
        metadata holding each result's dict, or None for an item without any. Raises
        jaxretrieval.index.BadFilterError for a filter that breaks the rules.
        """
        return self.search_embeddings(self.embed(images), k, threshold=threshold,
                                      filter=filter, with_metadata=with_metadata)

    def search_embeddings(self, vectors, k: int = 10, *, threshold: float | None = None,
                          filter: dict | None = None, with_metadata: bool = False):
        """As `search`, for query embeddings [n, d] computed already (numbers only: the
        index refuses booleans and strings)."""
        return self.index.search(vectors, k, threshold=threshold, filter=filter,
                                 with_metadata=with_metadata)

    def metadata_of(self, key: str) -> dict | None:
        """The metadata stored with an item, or None; UnknownItemError for an unknown key."""
        stored = self.resolve(key)
        if stored is None:
            raise UnknownItemError(f"no item with id {key!r}")
        return self.index.metadata_of(stored)

    def match(self, image_a, image_b, *, threshold: float | None = None) -> Match:
        """Are two images of the same class? Cosine similarity against `threshold`
        (default: the index's calibrated `match_threshold`)."""
        a, b = self.embed([image_a, image_b])
        return self.match_embeddings(a, b, threshold=threshold)

    def match_embeddings(self, a, b, *, threshold: float | None = None) -> Match:
        """As `match`, for two embeddings computed already."""
        return self._decision(float(np.dot(a, b)), threshold)

    def _decision(self, similarity: float, threshold: float | None) -> Match:
        threshold = self.match_threshold if threshold is None else float(threshold)
        same = None if threshold is None else similarity >= threshold
        return Match(similarity=similarity, same=same, threshold=threshold)

    def explain(self, image_a, image_b, *, threshold: float | None = None,
                stage: str | None = None) -> Explanation:
        """Which parts of two images (HxWxC uint8 arrays, PIL images or file paths) carry
        their similarity: the similarity, a heatmap per image over the positions of a
        backbone stage's feature map, each heatmap as an RGB overlay on the image as the
        model sees it (a face model's aligned chip), the method (`exact` or
        `grad_x_activation`), the stage, and the match decision as `match` gives it.

        `stage`: a stage's name (`explain_stages`), `final` for the map the head pools (the
        exact decomposition, where the head allows it), or None for the default stage (see
        `jaxretrieval.explain.default_stage`)."""
        a, b = load_images([image_a, image_b], InputSpec.of(self.embedder.config))
        return self.explain_uint8(a, b, threshold=threshold, stage=stage)

    def explain_stages(self) -> dict:
        """{stage name: (rows, columns) of its heatmaps}, in the backbone's order."""
        return stage_shapes(self.embedder.config, self.embedder.variables)

    def explain_uint8(self, image_a: np.ndarray, image_b: np.ndarray, *,
                      threshold: float | None = None, stage: str | None = None
                      ) -> Explanation:
        """As `explain`, for two uint8 [size, size, channels] model inputs (`decode_image`,
        `item_input`)."""
        with self._explainer_lock:
            check_explainable(self.embedder)
            if self._stages is None:
                self._stages = self.explain_stages()
            name = check_stage(self._stages, stage)
            if name not in self._explainers:  # one compiled function per stage, kept
                self._explainers[name] = Explainer.from_embedder(self.embedder, stage=name)
            explainer = self._explainers[name]
        similarities, heat_a, heat_b = explainer.explain_uint8(image_a[None], image_b[None])
        decision = self._decision(float(similarities[0]), threshold)
        return explanation((image_a, image_b), similarities[0], heat_a[0], heat_b[0],
                           explainer.method, same=decision.same,
                           threshold=decision.threshold, stage=name)

    # ------------------------------------------------------------------ video

    @property
    def video_sampling(self):
        """How the gallery's video frames were sampled (a video.decode.Sampling; the
        default rate for a gallery without videos)."""
        from jaxretrieval.video.decode import Sampling

        recorded = self.index.manifest.get("video")
        return Sampling(**recorded) if isinstance(recorded, dict) else Sampling()

    def decode_video(self, source, *, limits=None, sampling=None):
        """(times, inputs): the frames of a video (a file path or its bytes) sampled as the
        gallery's were (`video_sampling`, or `sampling`), as float64 [n] seconds and the
        model's uint8 [n, size, size, channels] inputs. Raises video.decode.VideoDecodeError
        for a video that cannot be decoded or breaks `limits` (a video.decode.Limits)."""
        from jaxretrieval.video.decode import Limits, sample_frames

        spec = InputSpec.of(self.embedder.config)
        frames = sample_frames(source, sampling or self.video_sampling,
                               limits=limits or Limits(),
                               convert=lambda image: to_model_input(image, spec))
        return (np.array([seconds for seconds, _ in frames], np.float64),
                np.stack([inputs for _, inputs in frames]))

    def search_video(self, query, k: int = 10, *, speeds=None, sampling=None) -> list:
        """The k videos of the gallery that best hold `query`, best first, as
        video.voting.VideoMatch(video, score, offset, frames, speed).

        `query` is a clip (a video file's path, or its bytes), whose frames are sampled as
        the gallery's were and voted on over (video, speed, offset) with speeds in
        `speeds` (default 0.8x to 1.25x), or an image (an array, a PIL image or an image
        file's path), for which each video scores its best frame (docs/video.md).
        """
        from jaxretrieval.video.decode import is_video_path
        from jaxretrieval.video.voting import DEFAULT_SPEEDS, search_clip_embeddings

        if isinstance(query, bytes) or (isinstance(query, (str, os.PathLike))
                                        and is_video_path(os.fspath(query))):
            times, inputs = self.decode_video(
                os.fspath(query) if not isinstance(query, bytes) else query, sampling=sampling)
            vectors = self.embed_uint8(inputs)
        else:
            times, vectors = np.zeros(1), self.embed([query])
        return search_clip_embeddings(
            lambda v, n: self.search_embeddings(v, min(n, max(1, self.count))), times,
            vectors, k, speeds=DEFAULT_SPEEDS if speeds is None else speeds)

    # ------------------------------------------------------------------ changing the gallery

    def upsert_images(self, keys, images, *, sources=None, metadata=None) -> None:
        """Embeds `images` (HxWxC uint8 arrays or file paths) and stores them under `keys`,
        replacing the items already under any of those keys.

        `sources`, one string per image, records where each image can be read again (a file
        path, or a dataset reference); it is what `thumbnail` shows. `metadata`, one
        small JSON object (or None) per image, is what searches return and filter on
        (jaxretrieval.index.metadata has the rules). Errors as `upsert_embeddings`, and
        JaxRetrievalError for an image that cannot be read.
        """
        self.upsert_embeddings(keys, self.embed(images), sources=sources, metadata=metadata)

    def upsert_embeddings(self, keys, embeddings, *, sources=None, metadata=None) -> None:
        """Stores L2-normalised float32 `embeddings` [n, embedding_dim] under `keys`,
        replacing the items already under any of those keys (metadata included: an item
        upserted without metadata has none); `sources` and `metadata` as in
        `upsert_images`.

        Searches see the change when this returns; on a writable Retriever it is also in
        the index's log on disk by then. Raises JaxRetrievalError, storing nothing, for a
        wrong dimension, rows that are not finite or not of unit length, keys that are not
        unique strings, or a key or source count that differs from the row count, and
        jaxretrieval.index.BadMetadataError for metadata that breaks the rules.
        """
        self.index.upsert(keys, embeddings, sources, metadata)

    def delete(self, keys) -> None:
        """Removes the items under `keys`, durably as `upsert_embeddings` does.

        A key may also be given as `jaxretrieval.index.shown_key` shows it (see `resolve`).
        Raises UnknownItemError, deleting nothing, if any key is not in the gallery.
        """
        if isinstance(keys, str):
            raise JaxRetrievalError("keys must be a list of strings, not one string")
        keys = list(keys)
        resolved = self._resolved_or_refused(keys)
        try:
            self.index.delete(resolved)
        except JaxRetrievalError:
            # Another thread may delete a key between the check above and the index's own,
            # under its lock: that is still an unknown key, not some other error.
            self._resolved_or_refused(keys)
            raise

    def _resolved_or_refused(self, keys) -> list[str]:
        resolved = [self.resolve(key) for key in keys]
        unknown = [key for key, found in zip(keys, resolved) if found is None]
        if unknown:
            raise UnknownItemError(
                f"no item with id {unknown[0]!r}" if len(unknown) == 1 else
                f"no items with ids {', '.join(map(repr, unknown))} (nothing was deleted)")
        return resolved

    # ------------------------------------------------------------------ thumbnails

    def thumbnail(self, key: str, *, side: int = THUMBNAIL_SIDE,
                  data_dir: str | None = None) -> Image.Image:
        """The image behind an item's source, shrunk to fit `side` x `side` pixels (tiny
        images are enlarged to at least THUMBNAIL_MIN_SIDE instead), in mode L or RGB.

        Sources are read only from where the gallery's dataset lies, as recorded when it was
        embedded (the index manifest's `source_roots`; for older indexes, an absolute
        `folder:` path or the TFDS name of its `dataset`), and from the `thumbnail_roots`
        this Retriever was given; symbolic links and `..` are resolved first. `data_dir` is
        the TFDS data directory of dataset sources (default: the one the model was trained
        from). Raises UnknownItemError for a key not in the gallery, and NoThumbnailError
        (one message for every reason, logged here in detail) for an item without a
        readable source inside those roots.
        """
        image = self.source_image(key, data_dir=data_dir)
        image.thumbnail((side, side))
        if max(image.size) < THUMBNAIL_MIN_SIDE:
            scale = THUMBNAIL_MIN_SIDE // max(image.size)
            image = image.resize((image.width * scale, image.height * scale),
                                 Image.Resampling.NEAREST)
        return image

    def item_input(self, key: str, *, data_dir: str | None = None) -> np.ndarray:
        """An item's image (`source_image`) as the model's uint8 input, as `decode_image`
        makes an upload's (for a face model, its aligned chip)."""
        return to_model_input(self.source_image(key, data_dir=data_dir),
                              InputSpec.of(self.embedder.config))

    def source_image(self, key: str, *, data_dir: str | None = None) -> Image.Image:
        """The whole image behind an item's source, in mode L or RGB; read from where, and
        refused as, `thumbnail` says."""
        stored = self.resolve(key)
        if stored is None:
            raise UnknownItemError(f"no item with id {key!r}")
        source = self.index.source_of(stored)
        if not source:
            raise NoThumbnailError(NO_THUMBNAIL)
        readable = resolve_within_roots(source, self.source_roots)
        if readable is None:
            logger.info("no thumbnail for %r: its source lies outside %s", stored,
                        self.source_roots)
            raise NoThumbnailError(NO_THUMBNAIL)
        try:
            image = eight_bit(read_resolved(
                readable, self.embedder.config.data_dir if data_dir is None else data_dir))
            image = image if image.mode in ("L", "RGB") else in_mode(image, "RGB")
        except Exception as err:  # whatever fails to read it, there is no image to show
            logger.info("no thumbnail for %r: %s", stored, err)
            raise NoThumbnailError(NO_THUMBNAIL) from None
        return image

    @property
    def source_roots(self) -> tuple:
        """Where thumbnails may be read from (see `thumbnail`)."""
        manifest = self.index.manifest
        roots = manifest.get("source_roots")
        if not isinstance(roots, list):
            dataset = manifest.get("dataset")
            roots = roots_of_reference(dataset if isinstance(dataset, str) else "")
        return tuple(root for root in roots if isinstance(root, str)) + self._thumbnail_roots
