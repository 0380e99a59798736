"""What the HTTP endpoints need from whatever answers them: `ServiceBackend`.

The endpoints reach the model and the index only through these methods (see
`test_the_service_reaches_the_model_and_the_index_only_through_the_retriever`). A
`Retriever` satisfies the protocol in one process; `jaxretrieval.rayserve.backend`
gives one whose embedder and index shards are Ray Serve deployments, so the one app
(`create_app`) serves both.
"""

from typing import Protocol, runtime_checkable

import numpy as np

# A small in-process index answers in tens of microseconds, less than a hop to a worker
# thread costs; larger ones, and remote ones (which wait on the network), search in a
# thread so that the event loop keeps serving.
INLINE_SEARCH_MAX_ITEMS = 20_000


@runtime_checkable
class ServiceBackend(Protocol):
    """The calls the endpoints make (see `Retriever` for what each means)."""

    in_process: bool  # False when calls wait on other processes (never run on the loop)

    @property
    def count(self) -> int: ...

    @property
    def embedding_dim(self) -> int: ...

    @property
    def match_threshold(self) -> float | None: ...

    def decode_image(self, data: bytes, *, max_pixels: int) -> np.ndarray: ...

    def decode_video(self, source, *, limits=None, sampling=None): ...

    def embed_uint8(self, images: np.ndarray) -> np.ndarray: ...

    def search_embeddings(self, vectors, k: int = 10, *, threshold: float | None = None,
                          filter=None, with_metadata: bool = False): ...

    def match_embeddings(self, a, b, *, threshold: float | None = None): ...

    def upsert_embeddings(self, keys, embeddings, *, sources=None, metadata=None) -> None: ...

    def delete(self, keys) -> None: ...

    def thumbnail(self, key: str, *, data_dir: str | None = None): ...

    def item_input(self, key: str, *, data_dir: str | None = None) -> np.ndarray: ...

    def explain_uint8(self, image_a: np.ndarray, image_b: np.ndarray, *,
                      threshold: float | None = None, stage: str | None = None): ...

    def close(self) -> None: ...


def searches_inline(backend: ServiceBackend) -> bool:
    """Whether a search is cheaper on the event loop than in a worker thread."""
    return backend.in_process and backend.count <= INLINE_SEARCH_MAX_ITEMS
