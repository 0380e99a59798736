"""SearchIndex: what callers may rely on from an index, flat (Index) or sharded (ShardedIndex)."""

from collections.abc import Set
from typing import Protocol, runtime_checkable


@runtime_checkable
class SearchIndex(Protocol):
    """A searchable gallery of L2-normalised embeddings under string keys, with live updates.

    `Index` and `ShardedIndex` both satisfy it; `open_index` returns either. Scores are
    dot products, higher is better.
    """

    @property
    def count(self) -> int:
        """How many items the index holds."""

    @property
    def embedding_dim(self) -> int:
        """The dimension of the embeddings."""

    @property
    def keys(self) -> list[str]:
        """Every live key."""

    @property
    def sources(self) -> list[str] | None:
        """The source of each key in `keys` order, or None when none is recorded."""

    @property
    def keys_set(self) -> Set:
        """The live keys as a read-only set."""

    @property
    def manifest(self) -> dict:
        """A copy of the manifest: model identity, ScaNN settings, caller entries, count."""

    @property
    def writable(self) -> bool:
        """True while changes are logged to a directory."""

    def __contains__(self, key) -> bool: ...

    def source_of(self, key: str) -> str | None:
        """The source recorded for `key`; an error if the key is not there."""

    def metadata_of(self, key: str) -> dict | None:
        """The metadata stored with `key`, or None; an error if the key is not there."""

    @property
    def has_metadata(self) -> bool:
        """Whether any item carries metadata."""

    def search(self, queries, k: int, *, threshold: float | None = None,
               filter: dict | None = None, with_metadata: bool = False) -> tuple:
        """Per query, up to min(k, count) keys and scores, best first, of the items that
        pass `filter`; with `with_metadata`, (keys, scores, metadata)."""

    def filter_plan(self, filter: dict | None, k: int = 10) -> dict:
        """How many items pass `filter` ("passing", "share") and the search's "strategy"."""

    def upsert(self, keys, embeddings, sources=None, metadata=None) -> None:
        """Adds items (with one metadata dict or None each), replacing those whose key is
        already there."""

    def delete(self, keys) -> None:
        """Removes items; nothing is removed if any key is unknown."""

    def update_manifest(self, **updates) -> None:
        """Adds or replaces caller manifest entries."""

    def compact(self) -> None:
        """Rebuilds the searchers over the live items."""

    def save(self, directory) -> None:
        """Writes the index to `directory`, replacing the index there."""

    def snapshot(self) -> None:
        """Saves a writable index's live state to its own directory."""

    def close(self) -> None:
        """Stops logging and lets another writer open the directory."""
