"""The in-memory contents of an index: snapshot rows under a ScaNN searcher, a delta, tombstones,
and each item's metadata."""

import collections.abc
import copy
import math

import numpy as np

from jaxretrieval.index.checks import row_by_key
from jaxretrieval.index.metadata import Postings
from jaxretrieval.index.precision import dtype_of, rounded
from jaxretrieval.index.scann_adapter import build_searcher, carried_settings, scann_settings

# Every search over-fetches one ScaNN result per tombstone and scans the
# delta exhaustively, so both must stay small: once tombstones plus delta
# rows pass this many, the searcher is rebuilt over the live rows. The
# fraction makes small galleries (cheap to rebuild) compact sooner.
COMPACT_MAX_PENDING = 4096
COMPACT_MIN_PENDING = 64
COMPACT_PENDING_FRACTION = 0.1


class State:
    """One immutable version of an index's searchable contents.

    Changes make a new State and swap it in; a search reads the reference
    once and uses only that object, so it sees a whole version, never half
    of a change.

    Ids: 0..n_base-1 are rows of the ScaNN searcher (the "base"); n_base + j
    is row j of the "delta", vectors upserted since the searcher was built
    and searched exactly with numpy. Replaced or deleted base rows stay in
    the searcher, marked `dead`, until `compacted()` builds a new one.

    Metadata: `base_metadata` (a dict or None per base row; None as a whole when no
    base row has any) and `delta_metadata` (one per delta row). The base rows'
    inverted index (`base_postings`) is built with the searcher and shared by every
    state made from this one by `with_changes`, as their base rows are the same.
    """

    def __init__(self, *, searcher, settings, has_sources, base_vectors,
                 base_keys, base_sources, base_row_by_key, dead, delta_vectors,
                 delta_keys, delta_sources, base_metadata=None, delta_metadata=None,
                 postings_cache=None):
        self.searcher = searcher
        self.settings = settings
        self.has_sources = has_sources
        self.base_vectors = base_vectors
        self.base_keys = base_keys
        self.base_sources = base_sources
        self.base_row_by_key = base_row_by_key
        self.dead = dead
        self.n_dead = int(np.count_nonzero(dead))
        self.delta_vectors = delta_vectors
        self.delta_keys = delta_keys
        self.delta_sources = delta_sources
        self.delta_slot_by_key = {key: slot for slot, key in enumerate(delta_keys)}
        self.base_metadata = base_metadata
        self.delta_metadata = ([None] * len(delta_keys) if delta_metadata is None
                               else delta_metadata)
        self._postings_cache = {} if postings_cache is None else postings_cache
        # What recent filters pass in this version (index/filtered.py fills it).
        self.filter_cache = {}
        # Derived lazily and cached; two threads racing to fill one compute
        # the same value, so no lock is needed.
        self._keys = None
        self._sources = None
        self._live_row_of_id = None

    @classmethod
    def from_rows(cls, vectors, keys, sources, *, has_sources, searcher=None,
                  settings=None, metadata=None):
        """A compacted state over `vectors`, building the searcher if not given.

        `metadata`: one dict or None per row, or None when no row has any."""
        if metadata is not None and all(item is None for item in metadata):
            metadata = None
        if settings is None:
            settings = scann_settings(len(vectors))
        if searcher is None:
            # Searched as they will be stored (rows read from a snapshot already are).
            vectors = rounded(vectors, dtype_of(settings))
            if len(vectors):
                searcher = build_searcher(vectors, settings)
        return cls(
            searcher=searcher, settings=settings, has_sources=has_sources,
            base_vectors=vectors, base_keys=keys, base_sources=sources,
            base_row_by_key=row_by_key(keys),
            dead=np.zeros(len(keys), bool),
            delta_vectors=np.zeros((0, vectors.shape[1]), np.float32),
            delta_keys=[], delta_sources=[] if has_sources else None,
            base_metadata=metadata,
            # Built now, beside the searcher, rather than in the first filtered search.
            postings_cache=None if metadata is None else {"postings": Postings(metadata)})

    @property
    def dim(self):
        return self.base_vectors.shape[1]

    @property
    def n_base(self):
        return len(self.base_keys)

    @property
    def count(self):
        return self.n_base - self.n_dead + len(self.delta_keys)

    @property
    def pending(self):
        """Rows a compaction would clean up: tombstones plus delta rows."""
        return self.n_dead + len(self.delta_keys)

    def locate(self, key):
        """The id of live `key`, or None."""
        slot = self.delta_slot_by_key.get(key)
        if slot is not None:
            return self.n_base + slot
        row = self.base_row_by_key.get(key)
        if row is not None and not self.dead[row]:
            return row
        return None

    def key_of(self, item_id):
        if item_id < self.n_base:
            return self.base_keys[item_id]
        return self.delta_keys[item_id - self.n_base]

    def source_of(self, item_id):
        if not self.has_sources:
            return None
        if item_id < self.n_base:
            return self.base_sources[item_id]
        return self.delta_sources[item_id - self.n_base]

    def metadata_of(self, item_id):
        if item_id < self.n_base:
            return None if self.base_metadata is None else self.base_metadata[item_id]
        return self.delta_metadata[item_id - self.n_base]

    @property
    def has_metadata(self):
        """Whether any row, live or not, carries metadata."""
        return self.base_metadata is not None or any(
            item is not None for item in self.delta_metadata)

    def any_live_metadata(self):
        """Whether any live item carries metadata (stops at the first)."""
        if any(item is not None for item in self.delta_metadata):
            return True
        return self.base_metadata is not None and any(
            item is not None and not self.dead[row]
            for row, item in enumerate(self.base_metadata))

    def base_postings(self):
        """The inverted index of the base rows' metadata (None when they have none)."""
        if self.base_metadata is None:
            return None
        postings = self._postings_cache.get("postings")
        if postings is None:
            # Two threads racing here build equal objects; either may be kept.
            postings = self._postings_cache["postings"] = Postings(self.base_metadata)
        return postings

    def live_metadata(self):
        """The metadata of the live items in `keys` order, or None when none has any."""
        if not self.has_metadata:
            return None
        base = self.base_metadata or [None] * self.n_base
        if self.pending:
            base = [base[row] for row in self._live_base_rows()]
        metadata = list(base) + self.delta_metadata
        return metadata if any(item is not None for item in metadata) else None

    def _live_base_rows(self):
        return np.flatnonzero(~self.dead)

    @property
    def keys(self):
        """Live keys: surviving base rows in order, then the delta."""
        if self._keys is None:
            if self.pending == 0:
                self._keys = self.base_keys
            else:
                self._keys = ([self.base_keys[row] for row in self._live_base_rows()]
                              + self.delta_keys)
        return self._keys

    @property
    def sources(self):
        if not self.has_sources:
            return None
        if self._sources is None:
            if self.pending == 0:
                self._sources = self.base_sources
            else:
                self._sources = ([self.base_sources[row]
                                  for row in self._live_base_rows()]
                                 + self.delta_sources)
        return self._sources

    def live_vectors(self):
        if self.pending == 0:
            return self.base_vectors
        return np.concatenate(
            [self.base_vectors[self._live_base_rows()], self.delta_vectors])

    def live_rows(self, ids):
        """Rows in `keys` order for ids from `search_ids` (-1 stays -1)."""
        if self.n_dead == 0:
            return ids  # delta ids already follow the base rows
        if self._live_row_of_id is None:
            live_base = ~self.dead
            base_rows = np.where(live_base, np.cumsum(live_base) - 1, -1)
            delta_rows = (np.count_nonzero(live_base)
                          + np.arange(len(self.delta_keys)))
            self._live_row_of_id = np.concatenate([base_rows, delta_rows])
        return np.where(ids >= 0, self._live_row_of_id[np.maximum(ids, 0)], -1)

    def recording_sources(self):
        """This state, recording sources from now on ("" for items so far)."""
        if self.has_sources:
            return self
        return State(
            searcher=self.searcher, settings=self.settings, has_sources=True,
            base_vectors=self.base_vectors, base_keys=self.base_keys,
            base_sources=[""] * self.n_base, base_row_by_key=self.base_row_by_key,
            dead=self.dead, delta_vectors=self.delta_vectors,
            delta_keys=self.delta_keys, delta_sources=[""] * len(self.delta_keys),
            base_metadata=self.base_metadata, delta_metadata=self.delta_metadata,
            postings_cache=self._postings_cache)

    def with_changes(self, changes):
        """A new state with `changes` applied.

        `changes` maps each key, in order, to (vector, source, metadata) to
        upsert it (the metadata replaces the old item's, so None removes it)
        or to None to delete it if present; a None source is recorded as ""
        if the state records sources. An upserted key moves to the end of
        the delta, as it would if applied one by one.
        """
        dead = self.dead
        removed_slots = set()
        for key in changes:
            slot = self.delta_slot_by_key.get(key)
            if slot is not None:
                removed_slots.add(slot)
                continue
            row = self.base_row_by_key.get(key)
            if row is not None and not dead[row]:
                if dead is self.dead:
                    dead = dead.copy()
                dead[row] = True
        kept_slots = [slot for slot in range(len(self.delta_keys))
                      if slot not in removed_slots]
        added = [(key, change) for key, change in changes.items() if change is not None]
        added_vectors = np.array([vector for _, (vector, _, _) in added],
                                 np.float32).reshape(len(added), self.dim)
        delta_sources = None
        if self.has_sources:
            delta_sources = ([self.delta_sources[slot] for slot in kept_slots]
                             + [source or "" for _, (_, source, _) in added])
        return State(
            searcher=self.searcher, settings=self.settings,
            has_sources=self.has_sources, base_vectors=self.base_vectors,
            base_keys=self.base_keys, base_sources=self.base_sources,
            base_row_by_key=self.base_row_by_key, dead=dead,
            delta_vectors=np.concatenate(
                [self.delta_vectors[kept_slots], added_vectors]),
            delta_keys=[self.delta_keys[slot] for slot in kept_slots]
            + [key for key, _ in added],
            delta_sources=delta_sources, base_metadata=self.base_metadata,
            delta_metadata=[self.delta_metadata[slot] for slot in kept_slots]
            + [metadata for _, (_, _, metadata) in added],
            postings_cache=self._postings_cache)

    def with_settings(self, settings):
        """This state, searched with other settings (same searcher and rows)."""
        state = copy.copy(self)
        state.settings = settings
        return state

    def compacted(self):
        """The same live items under a new searcher sized for them."""
        if self.pending == 0:
            return self
        vectors = self.live_vectors()
        return State.from_rows(
            vectors, self.keys, self.sources, has_sources=self.has_sources,
            settings=carried_settings(self.settings, len(vectors)),
            metadata=self.live_metadata())

    def compaction_due(self):
        limit = min(COMPACT_MAX_PENDING,
                    max(COMPACT_MIN_PENDING, COMPACT_PENDING_FRACTION * self.count))
        return self.pending > limit

    def base_candidates(self, queries, count, effort=1.0):
        """ScaNN's best `count` base rows (dead ones included) and their scores per query,
        best first; where it finds fewer, id -1 and score -inf. Needs a searcher.

        `effort` multiplies the leaves searched and the candidates reordered."""
        if self.settings["mode"] == "exact":
            ids, scores = self.searcher.search_batched(queries, count)
        else:
            # Reordering keeps only pre_reorder_num_neighbors candidates,
            # so a large count needs at least that many of them.
            # Both efforts come from the settings, which `Index.tune`
            # may have changed since the searcher was built.
            reorder = math.ceil(effort * self.settings["reorder_num_neighbors"])
            leaves = min(self.settings["num_leaves"],
                         math.ceil(effort * self.settings["num_leaves_to_search"]))
            ids, scores = self.searcher.search_batched(
                queries, count, pre_reorder_num_neighbors=max(count, reorder),
                leaves_to_search=leaves)
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        # ScaNN pads short result lists with row 0 and a NaN score.
        missing = np.isnan(scores)
        ids[missing] = -1
        scores[missing] = -np.inf
        return ids, scores

    def search_ids(self, queries, k):
        """Ids and scores of the best k live items per query, best first.

        k must be at most `count`. Missing slots hold id -1 and score -inf.
        """
        candidate_ids, candidate_scores = [], []
        if self.searcher is not None:
            # Exact search returns the best k + n_dead rows, of which at
            # most n_dead are dead, so at least k live ones survive.
            ids, scores = self.base_candidates(queries, min(self.n_base, k + self.n_dead))
            if self.n_dead:
                missing = self.dead[np.maximum(ids, 0)] & (ids >= 0)
                ids[missing] = -1
                scores[missing] = -np.inf
            if not self.delta_keys and self.n_dead == 0:
                return ids, scores  # already the answer, in ScaNN's order
            candidate_ids.append(ids)
            candidate_scores.append(scores)
        if self.delta_keys:
            scores = queries @ self.delta_vectors.T
            take = min(k, len(self.delta_keys))
            if take < len(self.delta_keys):
                slots = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            else:
                slots = np.broadcast_to(np.arange(take), scores.shape)
            candidate_ids.append(slots + self.n_base)
            candidate_scores.append(np.take_along_axis(scores, slots, axis=1))
        ids = np.concatenate(candidate_ids, axis=1)
        scores = np.concatenate(candidate_scores, axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(ids, best, axis=1),
                np.take_along_axis(scores, best, axis=1).astype(np.float32))


class KeySet(collections.abc.Set):
    """The live keys of one state, without building a set of them."""

    def __init__(self, state):
        self._state = state

    def __contains__(self, key):
        return isinstance(key, str) and self._state.locate(key) is not None

    def __iter__(self):
        return iter(self._state.keys)

    def __len__(self):
        return self._state.count
