"""The serving-time object: an Embedder and the index (flat or sharded) it was built with."""

import dataclasses

import numpy as np

from jaxretrieval.embed import Embedder
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import Index, ShardedIndex, open_index
from jaxretrieval.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Match:
    """The similarity of two images and, when a threshold is known, whether they match."""

    similarity: float
    same: bool | None
    threshold: float | None


class Retriever:
    """Embeds query images and searches the gallery index.

        r = Retriever.load("runs/default")
        keys, scores = r.search(images, k=10)   # images: HxWxC uint8 arrays or file paths
    """

    def __init__(self, embedder: Embedder, index: Index | ShardedIndex):
        if embedder.embedding_dim != index.embedding_dim:
            raise JaxRetrievalError(
                f"the model embeds to {embedder.embedding_dim} dimensions, the index holds "
                f"{index.embedding_dim}: rebuild the index with `python -m train --eval_only`")
        self.embedder = embedder
        self.index = index

    @classmethod
    def load(cls, workdir: str, *, writable: bool = False) -> "Retriever":
        """The latest checkpoint and `DIR/index/` (flat or sharded); refuses an index built
        by another model.

        `writable=True` opens the index for live updates (`index.upsert`, `index.delete`),
        each logged durably before it returns; one writer per workdir at a time.
        """
        embedder = Embedder.from_workdir(workdir)
        index = open_index(Workdir(workdir).index, writable=writable, expected={
            "embedding_dim": embedder.embedding_dim,
            "model_config_hash": embedder.model_config_hash,
            "checkpoint_step": embedder.checkpoint_step,
        })
        return cls(embedder, index)

    def warm_up(self, max_batch: int | None = None) -> None:
        """Compiles the embedding programs ahead of the first query."""
        self.embedder.warm_up(max_batch)

    def embed(self, images) -> np.ndarray:
        """L2-normalised float32 [n, d] embeddings of HxWxC uint8 arrays or image paths."""
        return self.embedder.embed(images)

    def search(self, images, k: int = 10, *, threshold: float | None = None):
        """(keys, scores): per query image, up to k gallery keys and their scores, best first."""
        return self.search_embeddings(self.embed(images), k, threshold=threshold)

    def search_embeddings(self, vectors, k: int = 10, *, threshold: float | None = None):
        """As `search`, for query embeddings [n, d] computed already."""
        return self.index.search(np.asarray(vectors, np.float32), k, threshold=threshold)

    @property
    def match_threshold(self) -> float | None:
        """The calibrated threshold: at the target precision (default 0.99) if one reached
        it, else the best-F1 one; None for an index without calibration."""
        thresholds = self.index.manifest.get("match_thresholds") or {}
        value = thresholds.get("at_target_precision")
        return value if value is not None else thresholds.get("best_f1")

    def match(self, image_a, image_b, *, threshold: float | None = None) -> Match:
        """Are two images of the same class? Cosine similarity against `threshold`
        (default: the index's calibrated `match_threshold`)."""
        a, b = self.embed([image_a, image_b])
        return self.match_embeddings(a, b, threshold=threshold)

    def match_embeddings(self, a, b, *, threshold: float | None = None) -> Match:
        """As `match`, for two embeddings computed already."""
        similarity = float(np.dot(a, b))
        threshold = self.match_threshold if threshold is None else float(threshold)
        same = None if threshold is None else similarity >= threshold
        return Match(similarity=similarity, same=same, threshold=threshold)
