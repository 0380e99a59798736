"""Index: a saved, searchable gallery of embeddings, served by ScaNN, with live updates.

Rows (ints 0..count-1) identify gallery items inside arrays; `keys` maps
rows to the caller's string ids. Scores are dot products of L2-normalised
vectors, so higher is better. The directory layout is storage's; the log's
format is wal's. Items may carry metadata, and searches may filter on it
(the rules: jaxretrieval.index.metadata; the strategy: jaxretrieval.index.filtered).
"""

import copy
import logging
import operator
import os
import threading

import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import checks, filtered, storage, tuning, wal
from jaxretrieval.index.metadata import checked_filter, checked_metadata_list
from jaxretrieval.index.scann_adapter import DISTANCE, scann_settings, scann_version
from jaxretrieval.index.state import KeySet, State

logger = logging.getLogger(__name__)


class Index:
    """A ScaNN searcher over a gallery, plus its keys and manifest.

    Make one with `Index.build` or `Index.load`. `upsert` and `delete`
    change it in memory at once; on an index loaded with `writable=True`
    they are also logged durably before they return. Searches may run in
    many threads at once, beside one thread changing the index.
    """

    def __init__(self, state, manifest):
        self._state = state
        # Replaced, never modified in place, so readers need no lock.
        self._manifest = manifest
        # Serialises changes and log appends; searches never take it.
        self._lock = threading.Lock()
        self._directory = None  # set while open for writing
        self._log = None
        self._writer_lock = None
        self._closed = False

    @classmethod
    def build(cls, embeddings, keys, *, sources=None, checkpoint_step,
              model_config_hash, extra_manifest=None, scann_overrides=None, metadata=None,
              embedding_dtype="float32"):
        """Indexes L2-normalised float32 `embeddings` [n, d] under `keys`.

        `sources` optionally names where each row came from, `metadata` gives
        each row a small JSON object or None (jaxretrieval.index.metadata). Galleries of
        more than EXACT_SEARCH_MAX_COUNT items get approximate search, whose
        automatic settings `scann_overrides` may replace in part (see
        `scann_settings`; for benchmarks); the manifest records them.
        `embedding_dtype` (float32, float16 or int8) is the precision the index stores
        and scores its rows in (jaxretrieval.index.precision).
        """
        embeddings, keys, sources = checks.checked_rows(embeddings, keys, sources)
        count, dim = embeddings.shape
        try:
            checkpoint_step = operator.index(checkpoint_step)
        except TypeError:
            raise JaxRetrievalError(
                f"checkpoint_step must be an integer, got {checkpoint_step!r}"
            ) from None
        if not isinstance(model_config_hash, str):
            raise JaxRetrievalError(
                f"model_config_hash must be a string, got {model_config_hash!r}")
        extra = checks.checked_manifest_updates(extra_manifest or {}, "extra_manifest")
        metadata = checked_metadata_list(metadata, count)

        state = State.from_rows(embeddings, keys, sources, has_sources=sources is not None,
                                settings=scann_settings(count, scann_overrides,
                                                        embedding_dtype),
                                metadata=metadata)
        manifest = {
            "format_version": storage.FORMAT_VERSION,
            "embedding_dim": dim,
            "count": count,
            "checkpoint_step": checkpoint_step,
            "model_config_hash": model_config_hash,
            "scann_version": scann_version(),
            "distance": DISTANCE,
            "scann": state.settings,
            **extra,
        }
        return cls(state, manifest)

    # ------------------------------------------------------------------ reading

    @property
    def manifest(self):
        """A copy of the manifest dict, with the live `count`."""
        state = self._state
        manifest = copy.deepcopy(self._manifest)
        manifest["count"] = state.count
        manifest["scann"] = copy.deepcopy(state.settings)
        return manifest

    @property
    def count(self):
        return self._state.count

    @property
    def embedding_dim(self):
        return self._state.dim

    @property
    def keys(self):
        """The key of each row, in row order. Shared: do not modify."""
        return self._state.keys

    @property
    def sources(self):
        """The source of each row, in row order, or None. Shared: do not modify."""
        return self._state.sources

    @property
    def writable(self):
        """True while changes are logged to a directory (see `load`)."""
        return self._log is not None

    @property
    def keys_set(self):
        """The live keys as a read-only set: `key in index.keys_set` is O(1)."""
        return KeySet(self._state)

    @property
    def pending(self):
        """Changes not yet compacted into the searcher: tombstones plus added rows."""
        return self._state.pending

    def __contains__(self, key):
        return self._state.locate(key) is not None

    def source_of(self, key):
        """The source recorded for `key` ("" if it was added without one).

        None if the index records no sources at all.
        """
        state = self._state
        item_id = state.locate(key)
        if item_id is None:
            raise JaxRetrievalError(f"key {key!r} is not in the index")
        return state.source_of(item_id)

    def metadata_of(self, key):
        """The metadata stored with `key` (a dict; do not modify), or None if it has none."""
        state = self._state
        item_id = state.locate(key) if isinstance(key, str) else None
        if item_id is None:
            raise JaxRetrievalError(f"key {key!r} is not in the index")
        return state.metadata_of(item_id)

    @property
    def has_metadata(self):
        """Whether any item carries metadata."""
        return self._state.any_live_metadata()

    @staticmethod
    def _search_ids(state, queries, k, conditions=None):
        queries = checks.checked_queries(queries, state.dim)
        k = min(checks.checked_positive_int(k, "k"), state.count)
        if queries.shape[0] == 0 or k == 0:
            # ScaNN rejects an empty batch.
            return (np.zeros((queries.shape[0], k), np.int64),
                    np.zeros((queries.shape[0], k), np.float32))
        if conditions is not None:
            return filtered.search_ids(state, queries, k, conditions)
        return state.search_ids(queries, k)

    def filter_plan(self, filter, k=10):
        """How a search for `k` items passing `filter` would run: {"passing" (items),
        "share" (of the index), "strategy" ("exact": brute force over the passing items;
        "over-fetch": more candidates from ScaNN, filtered)}; see index/filtered.py."""
        conditions = checked_filter(filter)
        k = checks.checked_positive_int(k, "k")
        state = self._state
        if conditions is None:
            return {"passing": state.count, "share": 1.0, "strategy": "unfiltered"}
        return filtered.plan(state, k, conditions)

    def search_rows(self, queries, k):
        """The best min(k, count) rows (positions in `keys`) and scores per query.

        `queries` is [m, d] or a single [d] vector. Returns int64 rows and
        float32 scores, both [m, min(k, count)], best first. Approximate
        search can find fewer than k items; missing slots hold row -1 and
        score -inf. Rows shift when items are deleted: use `search` for keys.
        """
        state = self._state
        ids, scores = self._search_ids(state, queries, k)
        return state.live_rows(ids), scores

    def search(self, queries, k, *, threshold=None, filter=None, with_metadata=False):
        """The best keys and scores for each query, best first.

        Returns (keys, scores): per query, lists of up to min(k, count)
        strings and Python floats. With `threshold`, results scoring below
        it are dropped. With `filter` (e.g. `{"label": "cat", "year": {"in":
        [2023, 2024]}}`; jaxretrieval.index.metadata), only items whose metadata
        passes it are searched: the results are the best min(k, passing) of
        those. With `with_metadata=True` it returns (keys, scores, metadata),
        metadata holding each result's dict, or None for an item without any.
        """
        threshold = checks.checked_threshold(threshold)
        conditions = checked_filter(filter)
        state = self._state
        ids, scores = self._search_ids(state, queries, k, conditions)
        all_keys, all_scores, all_metadata = [], [], []
        for query_ids, query_scores in zip(ids.tolist(), scores.tolist()):
            found_keys, found_scores, found_metadata = [], [], []
            for item_id, score in zip(query_ids, query_scores):
                if item_id < 0 or (threshold is not None and score < threshold):
                    continue
                found_keys.append(state.key_of(item_id))
                found_scores.append(score)
                if with_metadata:
                    found_metadata.append(state.metadata_of(item_id))
            all_keys.append(found_keys)
            all_scores.append(found_scores)
            all_metadata.append(found_metadata)
        if with_metadata:
            return all_keys, all_scores, all_metadata
        return all_keys, all_scores

    # ------------------------------------------------------------------ changing

    def update_manifest(self, **updates):
        """Adds or replaces manifest entries, e.g. `match_thresholds={...}`.

        Values must be JSON-serialisable. A writable index logs them; others
        keep them until `save`.
        """
        updates = checks.checked_manifest_updates(updates, "update_manifest")
        with self._lock:
            self._check_open()
            self._append_to_log({"op": "manifest", "updates": updates})
            self._manifest = {**self._manifest, **updates}

    def with_manifest(self, **updates):
        """An in-memory copy of this index with manifest entries added or replaced.

        The copy shares the (read-only) searcher and arrays with this one;
        it is not writable.
        """
        updated = Index(self._state, copy.deepcopy(self._manifest))
        updated.update_manifest(**updates)
        return updated

    def upsert(self, keys, embeddings, sources=None, metadata=None):
        """Adds items, replacing those whose key is already in the index.

        `embeddings` are L2-normalised float32 [n, d], one row per key;
        `sources`, if given, one string per key (without them, items record
        source ""); `metadata`, if given, one dict or None per key. An upsert
        replaces the whole item: one without metadata drops what the old item
        had. Searches see the change on return; on a writable index it is also
        on disk by then.
        """
        embeddings, keys, sources = checks.checked_rows(embeddings, keys, sources,
                                                        self.embedding_dim)
        metadata = checked_metadata_list(metadata, len(keys))
        with self._lock:
            self._check_open()
            if not keys:
                return
            state = self._state
            if sources is not None:
                state = state.recording_sources()
            new_state = state.with_changes({
                key: (embeddings[row], sources[row] if sources else None,
                      metadata[row] if metadata else None)
                for row, key in enumerate(keys)})
            record = {"op": "upsert", "keys": keys,
                      "embeddings": wal.encode_vectors(embeddings), "sources": sources}
            if metadata is not None:
                record["metadata"] = metadata
            self._append_to_log(record)
            self._install(new_state)

    def delete(self, keys):
        """Removes the items with these keys; unknown keys are an error.

        Nothing is deleted if any key is unknown.
        """
        keys = checks.checked_string_list(keys, "keys")
        with self._lock:
            self._check_open()
            state = self._state
            checks.refuse_unknown_keys([key for key in keys if state.locate(key) is None])
            changes = dict.fromkeys(keys)  # drops repeats, keeps order
            if not changes:
                return
            new_state = state.with_changes(changes)
            self._append_to_log({"op": "delete", "keys": list(changes)})
            self._install(new_state)

    def compact(self):
        """Rebuilds the searcher over the live items, dropping tombstones and delta.

        Runs by itself once enough changes pile up; results do not change
        (beyond approximate search's own variation).
        """
        with self._lock:
            self._state = self._state.compacted()

    def tune(self, target_recall=0.95, *, queries=None, k=10, sample=1000, seed=0):
        """Picks the cheapest search effort that reaches `target_recall` at `k`.

        For an approximate (tree + AH) index: measures recall@k against
        exact search for leaves searched and reordering counts, keeps the
        fastest setting whose recall reaches the target with a margin of
        TUNE_CONFIDENCE_Z standard errors, and searches with it from now on.
        The queries are `sample` gallery vectors (each searched without
        itself) or, if `queries` is given, up to `sample` of those; a
        further, disjoint set of as many is held out to check the choice.

        The choice goes into the manifest's `scann` settings (with a
        `tuned` record), so `save` keeps it and `load` restores it; on an
        index opened writable it is written by the next `snapshot()`. A
        compaction keeps the tuned share of leaves and reordering count.
        Changes wait while tuning runs; searches do not.

        Returns a report: the chosen `num_leaves_to_search` and
        `reorder_num_neighbors`, `tuning_recall`, `validation_recall`, and
        every setting timed (`candidates`). On an exact index, changes
        nothing and says so (`tuned` False).
        """
        target = checks.checked_target_recall(target_recall)
        k = checks.checked_positive_int(k, "k")
        sample = checks.checked_positive_int(sample, "sample")
        with self._lock:
            state = self._state
            if state.settings["mode"] != "tree_ah":
                return {"mode": state.settings["mode"], "tuned": False,
                        "message": "this index searches exactly (recall 1): "
                                   "there is nothing to tune"}
            settings, report = tuning.tune(state, target, queries=queries, k=k,
                                           sample=sample, seed=seed)
            self._state = state.with_settings(settings)
        logger.info("tuned the index for recall@%d >= %s: %d of %d leaves, reordering "
                    "%d; recall %.4f (tuning), %.4f (validation)", report["k"], target,
                    report["num_leaves_to_search"], report["num_leaves"],
                    report["reorder_num_neighbors"], report["tuning_recall"],
                    report["validation_recall"])
        return report

    def _check_open(self):
        if self._closed:
            raise JaxRetrievalError(
                "this index was closed, so changes would not be logged: open "
                "it again with Index.load(directory, writable=True)")

    def _install(self, state):
        self._state = state
        if state.compaction_due():
            try:
                self._state = state.compacted()
            except Exception:
                # The change is applied (and logged); failing the call now
                # would invite a retry of a delete that already happened.
                logger.exception("compacting the index failed; will retry later")

    def _append_to_log(self, record):
        """Writes `record` to the log and fsyncs it; no-op when not writable."""
        if self._log is None:
            return
        try:
            self._log.append(record)
        except BaseException:
            if self._log.broken:
                self._release()
                self._closed = True
            raise

    # ------------------------------------------------------------------ saving

    def write_snapshot(self, directory):
        """Writes the live items as a new snapshot of `directory` and points CURRENT at it.

        For savers that hold the directory's writer lock (`storage.WriterLock`) and
        finish the switch themselves (`storage.finish_switch`); returns (version,
        previous version) for that.
        """
        with self._lock:
            return self._write_snapshot_locked(directory)

    def _write_snapshot_locked(self, directory):
        # A snapshot holds one searcher over exactly the live rows; keep it, as it is
        # the one to search now.
        self._state = self._state.compacted()
        manifest = {**self._manifest, "count": self._state.count,
                    "scann": self._state.settings}
        return storage.write_snapshot(directory, self._state, manifest)

    def save(self, directory):
        """Writes the index to `directory` as a new snapshot, replacing any old one.

        If saving fails, an index already at `directory` is left untouched.
        On a writable index, saving to its own directory is `snapshot()`.
        """
        directory = os.path.abspath(os.fspath(directory))
        if self._directory is not None and os.path.realpath(directory) == os.path.realpath(
                self._directory):
            self.snapshot()
            return
        with storage.saving_into(directory, storage.prepare_directory(directory)):
            version, previous = self.write_snapshot(directory)
            storage.finish_switch(directory, version, previous)

    def snapshot(self):
        """Saves the live state of a writable index as a new snapshot with an empty log.

        Loading is then faster and the log stops growing. Results do not change.
        """
        with self._lock:
            self._check_open()
            if self._log is None:
                raise JaxRetrievalError(
                    "snapshot() needs an index opened with Index.load(directory, "
                    "writable=True); use save(directory) for this one")
            version, previous = self._write_snapshot_locked(self._directory)
            # CURRENT names the new snapshot now; log there from here on.
            self._open_log(version)
            storage.finish_switch(self._directory, version, previous)

    def _open_log(self, version):
        log = wal.Log(os.path.join(storage.snapshot_folder(self._directory, version),
                                   wal.LOG_FILE))
        if self._log is not None:
            self._log.close()
        self._log = log

    def close(self):
        """Stops logging and lets another writer open the directory.

        The index stays searchable; further changes raise.
        """
        with self._lock:
            if self._writer_lock is not None:
                self._release()
                self._closed = True

    def _release(self):
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._writer_lock is not None:
            self._writer_lock.release()
            self._writer_lock = None
        self._directory = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, directory, *, expected=None, writable=False, damaged_logs=None):
        """Loads the index saved at `directory`, replaying its log of changes.

        `expected` maps manifest keys (e.g. embedding_dim, model_config_hash,
        checkpoint_step) to the values the caller needs; any difference is
        an error telling the user to rebuild the index.

        With `writable=True` this process becomes the directory's one
        writer until `close()`: `upsert`, `delete` and `update_manifest`
        are logged durably before they return, and `snapshot()` works. A
        damaged last log line is then copied into `damaged_logs` (default
        DIRECTORY/damaged-logs) before it is cut off.
        """
        directory = storage.flat_index_directory(directory)
        if not writable:
            state, manifest, _, _ = storage.read_index(directory)
            index = cls(state, manifest)
            storage.check_expected(directory, index.manifest, expected)
            return index

        writer_lock = storage.WriterLock(directory)
        try:
            state, manifest, version, log = storage.read_index(directory)
            index = cls(state, manifest)
            storage.check_expected(directory, index.manifest, expected)
            index._directory = directory
            if version is None:
                # Convert format 1: a snapshot to log beside.
                version, previous = storage.write_snapshot(directory, state, manifest)
                index._open_log(version)
                storage.finish_switch(directory, version, previous)
            else:
                log_path, intact_size = log
                wal.cut_to_intact(log_path, intact_size, damaged_logs or os.path.join(
                    directory, storage.DAMAGED_LOGS_DIR))
                index._open_log(version)
                storage.fsync_path(os.path.dirname(log_path))  # in case it was created
        except BaseException:
            writer_lock.release()
            raise
        index._writer_lock = writer_lock
        return index
