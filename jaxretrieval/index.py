"""A saved, searchable gallery of embeddings, served by ScaNN, with live updates.

Rows (ints 0..count-1) identify gallery items inside arrays; `keys` maps
rows to the caller's string ids. Scores are dot products of L2-normalised
vectors, so higher is better.

On-disk layout of an index directory (format 2):

    CURRENT                   the name of the snapshot in use, e.g. "00000003"
    LOCK                      held (flock) by the one writer: save, snapshot,
                              or an index opened with `writable=True`
    snapshots/<version>/      one complete snapshot:
        manifest.json         format version, model identity, ScaNN settings, ...
        keys.json             JSON list of row keys
        sources.json          JSON list of row sources (absent when there are none)
        embeddings.npy        float32 [count, dim], so the index can be rebuilt
        scann/                ScaNN's serialized searcher (absent when count is 0)
        wal.jsonl             write-ahead log of changes made since the snapshot

Saving writes a new snapshot folder (under a temporary name, renamed once
complete and fsynced) and then replaces CURRENT atomically; a folder cannot
replace a non-empty folder, hence the pointer file. Snapshots other than the
new one and the one CURRENT named before are deleted after the switch, so a
reader that has just read CURRENT still finds its files.

Each line of wal.jsonl is `<crc32 of body, 8 hex digits> <body>`, the body
one JSON object: {"op": "upsert", "keys": [...], "embeddings": base64 of
little-endian float32 [n, dim], "sources": [...] or null},
{"op": "delete", "keys": [...]} or {"op": "manifest", "updates": {...}}.
A writable index appends and fsyncs a line before a change is applied and
returned. Loading replays the log; a damaged last line is a write cut short
by a crash, never acknowledged, and is ignored; a damaged earlier line is
corruption.

Format 1 directories (the snapshot files directly in the directory, no
CURRENT) still load; saving into one, or opening it writable, converts it.

Loading never unpickles anything: ScaNN's `load_searcher` would unpickle a
`scann_docids.pkl` if one were present, so we construct the searcher from
its assets ourselves and never hand doc ids to ScaNN.
"""

import base64
import collections.abc
import contextlib
import copy
import fcntl
import importlib.metadata
import json
import logging
import math
import operator
import os
import re
import shutil
import tempfile
import threading
import time
import zlib

import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.fileio import recover_interrupted_swap, write_file_atomically

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
EXACT_SEARCH_MAX_COUNT = 20_000  # above this, tree + asymmetric hashing + reordering

DISTANCE = "dot_product"
REORDER_NUM_NEIGHBORS = 200
# Leaves: this many times sqrt(count) (FAISS's IVF advice is 4 to 16), with
# at least MIN_ROWS_PER_LEAF rows each. A fine partition pays off where the
# data has many small clusters: a leaf per cluster puts a query's neighbours
# in one or two leaves, where coarser leaves mix clusters and need far more
# of them searched. ScaNN dissolves any leaf that gets fewer than its
# min_partition_size of the k-means sample (its default 50 is twice the
# sample per leaf at 10,000 leaves), which undid the fine partition:
# MIN_PARTITION_SAMPLE keeps such leaves (measured in BENCHMARKS.md).
# SOAR files each vector under a second leaf too, chosen so its
# residual is near-orthogonal to the first's: more recall per leaf searched
# (lambda 1.0 searched faster than 1.5 at the same recall, measured on the
# earlier 2,000-leaf tree). AH codes 4 dimensions per 4-bit code; exact
# reordering fixes what the coarser code misorders. Each was measured on
# that set (BENCHMARKS.md).
LEAVES_PER_SQRT_COUNT = 10
MIN_ROWS_PER_LEAF = 50
MIN_PARTITION_SAMPLE = 5
SCANN_DEFAULT_MIN_PARTITION_SIZE = 50  # what indexes saved before the setting used
SOAR_LAMBDA = 1.0
LEAVES_TO_SEARCH_FRACTION = 0.05
# Small trees would search only one or two leaves at 5%, which costs recall
# for almost no speed.
MIN_LEAVES_TO_SEARCH = 10
MAX_TRAINING_SAMPLE_SIZE = 250_000
AH_DIMENSIONS_PER_BLOCK = 4
AH_ANISOTROPIC_THRESHOLD = 0.2
NORM_TOLERANCE = 1e-2

# Index.tune tries reordering counts of k (k + 1 for gallery queries) and
# these, up to the gallery size; for each, the fewest leaves that reach the
# target; then times those pairs and keeps the fastest.
TUNE_REORDER_CANDIDATES = (20, 50, 100, 200, 400, 1000)
# A setting reaches the target when its recall on the tuning queries, less
# this many standard errors (over queries), does: choosing the cheapest of
# many noisy measurements otherwise lands just below the target on others.
TUNE_CONFIDENCE_Z = 3.0
TUNE_TIMING_REPEATS = 3
# Exact search for tuning: gallery rows scored per block.
EXACT_BLOCK_ROWS = 16384
# A result counts as a true neighbour when its exact score is at least the
# k-th best exact score less this (so ties and duplicates count).
RECALL_SCORE_TOLERANCE = 1e-5

# Every search over-fetches one ScaNN result per tombstone and scans the
# delta exhaustively, so both must stay small: once tombstones plus delta
# rows pass this many, the searcher is rebuilt over the live rows. The
# fraction makes small galleries (cheap to rebuild) compact sooner.
COMPACT_MAX_PENDING = 4096
COMPACT_MIN_PENDING = 64
COMPACT_PENDING_FRACTION = 0.1

# A reader can lose the race with two snapshots in a row deleting the one it
# was reading; it then starts again from the new CURRENT.
LOAD_ATTEMPTS = 3

CURRENT_FILE = "CURRENT"
LOCK_FILE = "LOCK"
SNAPSHOTS_DIR = "snapshots"
LOG_FILE = "wal.jsonl"
MANIFEST_FILE = "manifest.json"
# A sharded index's manifest (jaxretrieval.sharded_index): a directory holding it is sharded.
SHARDS_FILE = "shards.json"
KEYS_FILE = "keys.json"
SOURCES_FILE = "sources.json"
EMBEDDINGS_FILE = "embeddings.npy"
SCANN_DIR = "scann"
SCANN_ASSETS_FILE = "scann_assets.pbtxt"
# What a format 1 directory holds, all removed once it has been converted.
FLAT_LAYOUT_ENTRIES = (MANIFEST_FILE, KEYS_FILE, SOURCES_FILE, EMBEDDINGS_FILE, SCANN_DIR)
TEMPORARY_SNAPSHOT_PREFIX = ".tmp-"
VERSION_PATTERN = re.compile(r"[0-9]{1,20}")

# Keys the index itself maintains; callers may add any others.
CORE_MANIFEST_KEYS = frozenset({
    "format_version", "embedding_dim", "count", "checkpoint_step",
    "model_config_hash", "scann_version", "distance", "scann",
})

REBUILD_HINT = ("rebuild it with `python -m train --eval_only --workdir DIR` "
                "(DIR is the training workdir)")


def _scann_ops_pybind():
    # Imported lazily: `import scann` also imports TensorFlow, which takes
    # seconds and is not needed until an index is built or loaded.
    from scann.scann_ops.py import scann_ops_pybind
    return scann_ops_pybind


def _scann_version():
    import scann
    version = getattr(scann, "__version__", None)
    return version or importlib.metadata.version("scann")


def _as_float_matrix(values, what):
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise JaxRetrievalError(
            f"{what} must be numeric float arrays; converting failed: {error}"
        ) from None
    return array


def _check_finite(array, what):
    if not np.isfinite(array).all():
        bad_row = int(np.argwhere(~np.isfinite(array))[0][0])
        raise JaxRetrievalError(
            f"{what} contain NaN or infinite values (first at row {bad_row}); "
            "check the model outputs before indexing or searching")


def _checked_embeddings(embeddings, *, index_dim=None):
    """`embeddings` as a contiguous float32 [n, d] array of unit rows.

    With `index_dim` (adding to an existing index) d must equal it and n
    may be 0; without it (building) the gallery may not be empty.
    """
    array = _as_float_matrix(embeddings, "embeddings")
    if array.ndim != 2:
        raise JaxRetrievalError(
            f"embeddings must have shape [count, dim], got shape {array.shape}")
    count, dim = array.shape
    if index_dim is None and count == 0:
        raise JaxRetrievalError(
            "the gallery is empty: pass at least one embedding to Index.build")
    if dim == 0:
        raise JaxRetrievalError("embeddings have dimension 0")
    if index_dim is not None and dim != index_dim:
        raise JaxRetrievalError(
            f"embeddings have dimension {dim} but the index has dimension "
            f"{index_dim}; embed them with the same model that built the index")
    _check_finite(array, "embeddings")
    norms = np.linalg.norm(array, axis=1)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        bad_row = int(np.argmax(off))
        raise JaxRetrievalError(
            f"embeddings must be L2-normalised (scores are dot products), but "
            f"row {bad_row} has norm {norms[bad_row]:.4f}; divide each row "
            "by its norm before adding it to the index")
    return np.ascontiguousarray(array)


def _checked_string_list(values, what):
    if isinstance(values, (str, bytes)):
        raise JaxRetrievalError(f"{what} must be a list of strings, not one string")
    try:
        strings = list(values)
    except TypeError:
        raise JaxRetrievalError(
            f"{what} must be a list of strings, got {type(values).__name__}") from None
    for row, value in enumerate(strings):
        if not isinstance(value, str):
            raise JaxRetrievalError(
                f"{what} must be strings, but row {row} is "
                f"{type(value).__name__} {value!r}")
    # Plain str, so numpy string scalars don't leak out through `keys`.
    return [str(value) for value in strings]


def _checked_strings(values, count, what):
    strings = _checked_string_list(values, what)
    if len(strings) != count:
        raise JaxRetrievalError(
            f"got {count} embeddings but {len(strings)} {what}; "
            "pass exactly one per embedding row")
    return strings


def _row_by_key(keys):
    row_by_key = {}
    for row, key in enumerate(keys):
        if key in row_by_key:
            raise JaxRetrievalError(
                f"duplicate key {key!r} at rows {row_by_key[key]} and {row}; "
                "every gallery item needs a unique key")
        row_by_key[key] = row
    return row_by_key


def _json_normalised(value, what):
    # A JSON round trip now means the manifest compares equal after load
    # (tuples become lists, etc.) and bad values fail here, not in save().
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise JaxRetrievalError(
            f"{what} must be JSON-serialisable (plain dicts, lists, str, int, "
            f"finite float): {error}") from None


def _refuse_reserved_keys(updates, reserved, what, owner="index"):
    clashing = sorted(reserved.intersection(updates))
    if clashing:
        raise JaxRetrievalError(
            f"{what} may not set {', '.join(clashing)}: the {owner} maintains those itself")


def _checked_manifest_updates(updates, what):
    _refuse_reserved_keys(updates, CORE_MANIFEST_KEYS, what)
    return _json_normalised(dict(updates), what)


def _refuse_unknown_keys(unknown):
    """A delete names keys that are not there: refused whole, so nothing is deleted."""
    if unknown:
        named = ", ".join(repr(key) for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise JaxRetrievalError(
            f"cannot delete {named}{more}: not in the index (nothing was deleted); check "
            "the keys against index.keys")


def _scann_settings(count):
    if count <= EXACT_SEARCH_MAX_COUNT:
        return {"mode": "exact"}
    num_leaves = max(2, min(round(LEAVES_PER_SQRT_COUNT * math.sqrt(count)),
                            count // MIN_ROWS_PER_LEAF))
    num_leaves_to_search = min(
        num_leaves,
        max(MIN_LEAVES_TO_SEARCH,
            math.ceil(LEAVES_TO_SEARCH_FRACTION * num_leaves)))
    return {
        "mode": "tree_ah",
        "num_leaves": num_leaves,
        "num_leaves_to_search": num_leaves_to_search,
        "training_sample_size": min(count, MAX_TRAINING_SAMPLE_SIZE),
        "min_partition_size": MIN_PARTITION_SAMPLE,
        "dimensions_per_block": AH_DIMENSIONS_PER_BLOCK,
        "anisotropic_quantization_threshold": AH_ANISOTROPIC_THRESHOLD,
        "reorder_num_neighbors": REORDER_NUM_NEIGHBORS,
        "soar_lambda": SOAR_LAMBDA,
    }


def _carried_settings(settings, count):
    """Settings for a new searcher over `count` rows that keep a tuned effort.

    Compaction rebuilds the searcher; the share of leaves and the reordering
    count that `Index.tune` chose carry over to the new tree, along with the
    record of the tuning. Recall can drift after many changes: tune again.
    """
    fresh = _scann_settings(count)
    tuned = settings.get("tuned")
    if tuned is None or settings.get("mode") != "tree_ah" or fresh["mode"] != "tree_ah":
        return fresh
    share = settings["num_leaves_to_search"] / settings["num_leaves"]
    fresh["num_leaves_to_search"] = min(
        fresh["num_leaves"], max(1, math.ceil(share * fresh["num_leaves"] - 1e-9)))
    fresh["reorder_num_neighbors"] = settings["reorder_num_neighbors"]
    fresh["tuned"] = copy.deepcopy(tuned)
    return fresh


def _build_searcher(embeddings, settings):
    builder = _scann_ops_pybind().builder(embeddings, 10, DISTANCE)
    if settings["mode"] == "exact":
        builder = builder.score_brute_force()
    else:
        # Keys added after format 2's first release are optional: indexes
        # saved without them were built without them.
        builder = builder.tree(
            num_leaves=settings["num_leaves"],
            num_leaves_to_search=settings["num_leaves_to_search"],
            training_sample_size=settings["training_sample_size"],
            min_partition_size=settings.get("min_partition_size",
                                            SCANN_DEFAULT_MIN_PARTITION_SIZE),
            soar_lambda=settings.get("soar_lambda"),
        ).score_ah(
            settings["dimensions_per_block"],
            anisotropic_quantization_threshold=settings[
                "anisotropic_quantization_threshold"],
        ).reorder(settings["reorder_num_neighbors"])
    # No docids: ScaNN would pickle them on serialize(); rows are its ids.
    return builder.build()


def _load_searcher(scann_dir):
    from google.protobuf import text_format
    from scann.scann_ops import scann_assets_pb2

    assets_path = os.path.join(scann_dir, SCANN_ASSETS_FILE)
    with open(assets_path) as file:
        try:
            assets = text_format.Parse(file.read(), scann_assets_pb2.ScannAssets())
        except text_format.ParseError as error:
            raise ValueError(f"{SCANN_ASSETS_FILE}: {error}") from None
    # Older or foreign assets may hold absolute paths of the directory they
    # were written to; read every asset from this directory instead, and
    # never from anywhere outside it.
    for asset in assets.assets:
        asset.asset_path = os.path.basename(asset.asset_path)
        if not os.path.isfile(os.path.join(scann_dir, asset.asset_path)):
            raise FileNotFoundError(os.path.join(scann_dir, asset.asset_path))
    pybind = _scann_ops_pybind()
    # Not pybind.load_searcher(): it unpickles scann_docids.pkl if present.
    searcher = pybind.scann_pybind.ScannNumpy(
        os.path.abspath(scann_dir), text_format.MessageToString(assets))
    return pybind.ScannSearcher(searcher)


def _read_json(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, ensure_ascii=False)
        file.write("\n")


class _State:
    """One immutable version of an index's searchable contents.

    Changes make a new _State and swap it in; a search reads the reference
    once and uses only that object, so it sees a whole version, never half
    of a change.

    Ids: 0..n_base-1 are rows of the ScaNN searcher (the "base"); n_base + j
    is row j of the "delta", vectors upserted since the searcher was built
    and searched exactly with numpy. Replaced or deleted base rows stay in
    the searcher, marked `dead`, until `compacted()` builds a new one.
    """

    def __init__(self, *, searcher, settings, has_sources, base_vectors,
                 base_keys, base_sources, base_row_by_key, dead, delta_vectors,
                 delta_keys, delta_sources):
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
        # Derived lazily and cached; two threads racing to fill one compute
        # the same value, so no lock is needed.
        self._keys = None
        self._sources = None
        self._live_row_of_id = None

    @classmethod
    def from_rows(cls, vectors, keys, sources, *, has_sources, searcher=None,
                  settings=None):
        """A compacted state over `vectors`, building the searcher if not given."""
        if settings is None:
            settings = _scann_settings(len(vectors))
        if searcher is None and len(vectors):
            searcher = _build_searcher(vectors, settings)
        return cls(
            searcher=searcher, settings=settings, has_sources=has_sources,
            base_vectors=vectors, base_keys=keys, base_sources=sources,
            base_row_by_key=_row_by_key(keys),
            dead=np.zeros(len(keys), bool),
            delta_vectors=np.zeros((0, vectors.shape[1]), np.float32),
            delta_keys=[], delta_sources=[] if has_sources else None)

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
        return _State(
            searcher=self.searcher, settings=self.settings, has_sources=True,
            base_vectors=self.base_vectors, base_keys=self.base_keys,
            base_sources=[""] * self.n_base, base_row_by_key=self.base_row_by_key,
            dead=self.dead, delta_vectors=self.delta_vectors,
            delta_keys=self.delta_keys, delta_sources=[""] * len(self.delta_keys))

    def with_changes(self, changes):
        """A new state with `changes` applied.

        `changes` maps each key, in order, to (vector, source) to upsert it
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
        added_vectors = np.array([vector for _, (vector, _) in added],
                                 np.float32).reshape(len(added), self.dim)
        delta_sources = None
        if self.has_sources:
            delta_sources = ([self.delta_sources[slot] for slot in kept_slots]
                             + [source or "" for _, (_, source) in added])
        return _State(
            searcher=self.searcher, settings=self.settings,
            has_sources=self.has_sources, base_vectors=self.base_vectors,
            base_keys=self.base_keys, base_sources=self.base_sources,
            base_row_by_key=self.base_row_by_key, dead=dead,
            delta_vectors=np.concatenate(
                [self.delta_vectors[kept_slots], added_vectors]),
            delta_keys=[self.delta_keys[slot] for slot in kept_slots]
            + [key for key, _ in added],
            delta_sources=delta_sources)

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
        return _State.from_rows(
            vectors, self.keys, self.sources, has_sources=self.has_sources,
            settings=_carried_settings(self.settings, len(vectors)))

    def compaction_due(self):
        limit = min(COMPACT_MAX_PENDING,
                    max(COMPACT_MIN_PENDING, COMPACT_PENDING_FRACTION * self.count))
        return self.pending > limit

    def search_ids(self, queries, k):
        """Ids and scores of the best k live items per query, best first.

        k must be at most `count`. Missing slots hold id -1 and score -inf.
        """
        candidate_ids, candidate_scores = [], []
        if self.searcher is not None:
            # Exact search returns the best k + n_dead rows, of which at
            # most n_dead are dead, so at least k live ones survive.
            base_k = min(self.n_base, k + self.n_dead)
            if self.settings["mode"] == "exact":
                ids, scores = self.searcher.search_batched(queries, base_k)
            else:
                # Reordering keeps only pre_reorder_num_neighbors candidates,
                # so a large k needs at least k of them.
                # Both efforts come from the settings, which `Index.tune`
                # may have changed since the searcher was built.
                ids, scores = self.searcher.search_batched(
                    queries, base_k,
                    pre_reorder_num_neighbors=max(
                        base_k, self.settings["reorder_num_neighbors"]),
                    leaves_to_search=self.settings["num_leaves_to_search"])
            ids = np.asarray(ids, dtype=np.int64)
            scores = np.asarray(scores, dtype=np.float32)
            # ScaNN pads short result lists with row 0 and a NaN score.
            missing = np.isnan(scores)
            if self.n_dead:
                missing |= self.dead[ids]
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


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root):
    # Files and then their folders, so a crash after the caller's rename
    # cannot leave a snapshot whose names exist but whose bytes don't.
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)


class _WriterLock:
    """An exclusive flock on DIR/LOCK: one writer per index directory.

    The kernel drops it when the process dies, even by SIGKILL.
    """

    def __init__(self, directory):
        self._file = open(os.path.join(directory, LOCK_FILE), "ab")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise JaxRetrievalError(
                f"the index at {directory} is open for writing elsewhere (an "
                "Index loaded with writable=True, in this or another process); "
                "close that one (index.close()) before writing here") from None

    def release(self):
        self._file.close()  # closing the file releases the flock


@contextlib.contextmanager
def _saving_into(directory, created: bool):
    """Holds `directory`'s writer lock while a save writes there; a directory the save
    itself created is removed again if the save fails."""
    try:
        writer_lock = _WriterLock(directory)
        try:
            yield
        finally:
            writer_lock.release()
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _read_current(directory):
    """The snapshot version CURRENT names, or None for a format 1 or new directory."""
    try:
        with open(os.path.join(directory, CURRENT_FILE), encoding="ascii") as file:
            version = file.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise JaxRetrievalError(
            f"the index at {directory} is corrupt (unreadable {CURRENT_FILE}: "
            f"{error}): {REBUILD_HINT}") from None
    # Checked, so a damaged CURRENT cannot point outside snapshots/.
    if not VERSION_PATTERN.fullmatch(version):
        raise JaxRetrievalError(
            f"the index at {directory} is corrupt ({CURRENT_FILE} holds "
            f"{version[:40]!r}, not a snapshot version): {REBUILD_HINT}")
    return version


def _snapshot_folder(directory, version):
    if version is None:
        return directory
    return os.path.join(directory, SNAPSHOTS_DIR, version)


def snapshot_directory(directory):
    """The folder holding the current files (manifest.json, ...) of the index at `directory`.

    For a format 1 index that is `directory` itself.
    """
    directory = os.path.abspath(os.fspath(directory))
    return _snapshot_folder(directory, _read_current(directory))


def _is_index_directory(directory):
    entries = set(os.listdir(directory))
    return (not entries or CURRENT_FILE in entries or MANIFEST_FILE in entries
            # What a first save killed before its switch leaves behind.
            or entries <= {LOCK_FILE, SNAPSHOTS_DIR})


def _next_numbered_name(parent, previous):
    """The name of the next numbered folder in `parent`, after `previous` too.

    Above every folder, even unfinished ones, so no name is ever reused (a
    reader following an older name finds its folder or none).
    """
    taken = [int(name) for name in os.listdir(parent) if VERSION_PATTERN.fullmatch(name)]
    if previous is not None:
        taken.append(int(previous))
    return f"{max(taken, default=0) + 1:08d}"


def _next_version(directory, previous):
    return _next_numbered_name(os.path.join(directory, SNAPSHOTS_DIR), previous)


def _write_snapshot_files(folder, state, manifest):
    if state.searcher is not None:
        scann_dir = os.path.join(folder, SCANN_DIR)
        os.mkdir(scann_dir)
        # Relative asset paths, so the index still loads once renamed.
        state.searcher.serialize(scann_dir, relative_path=True)
    np.save(os.path.join(folder, EMBEDDINGS_FILE), state.base_vectors)
    _write_json(os.path.join(folder, KEYS_FILE), state.base_keys)
    if state.has_sources:
        _write_json(os.path.join(folder, SOURCES_FILE), state.base_sources)
    _write_json(os.path.join(folder, MANIFEST_FILE),
                {**manifest, "format_version": FORMAT_VERSION})
    open(os.path.join(folder, LOG_FILE), "wb").close()


def _write_snapshot(directory, state, manifest):
    """Writes `state` (compacted) as a new snapshot and points CURRENT at it.

    The caller holds the writer lock. Returns (version, previous version).
    If this raises, CURRENT and every existing snapshot are unchanged.
    """
    snapshots = os.path.join(directory, SNAPSHOTS_DIR)
    os.makedirs(snapshots, exist_ok=True)
    try:
        previous = _read_current(directory)
    except JaxRetrievalError:
        previous = None  # a damaged index is being replaced
    version = _next_version(directory, previous)
    folder = tempfile.mkdtemp(dir=snapshots, prefix=TEMPORARY_SNAPSHOT_PREFIX)
    try:
        _write_snapshot_files(folder, state, manifest)
        _fsync_tree(folder)
        final_folder = os.path.join(snapshots, version)
        os.rename(folder, final_folder)
        folder = final_folder
        _fsync_path(snapshots)
        write_file_atomically(os.path.join(directory, CURRENT_FILE), version + "\n")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return version, previous


def _finish_switch(directory, version, previous):
    """Makes the CURRENT switch durable, then deletes what nothing needs."""
    _fsync_path(directory)
    snapshots = os.path.join(directory, SNAPSHOTS_DIR)
    for name in os.listdir(snapshots):
        stale = (VERSION_PATTERN.fullmatch(name) and name not in (version, previous)
                 or name.startswith(TEMPORARY_SNAPSHOT_PREFIX))
        if stale:
            shutil.rmtree(os.path.join(snapshots, name), ignore_errors=True)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name == SCANN_DIR:
            shutil.rmtree(path, ignore_errors=True)
        elif name in FLAT_LAYOUT_ENTRIES or name.startswith(f".{CURRENT_FILE}.tmp-"):
            try:
                os.remove(path)
            except OSError as error:
                # The switch has happened; a leftover only wastes space.
                logger.warning("could not remove %s: %s", path, error)


def _encode_log_record(record):
    body = json.dumps(record, ensure_ascii=True, allow_nan=False,
                      separators=(",", ":")).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_log_line(line):
    """The record on one log line, or None if the line is damaged."""
    checksum, _, body = line.partition(b" ")
    if len(checksum) != 8 or not re.fullmatch(rb"[0-9a-f]{8}", checksum):
        return None
    if int(checksum, 16) != zlib.crc32(body):
        return None
    try:
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _read_log(path):
    """(records, bytes of intact lines, file size) of a snapshot's log."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return [], 0, 0
    *lines, tail = data.split(b"\n")
    records, intact_size = [], 0
    for number, line in enumerate(lines, 1):
        record = _decode_log_line(line)
        if record is None:
            if number == len(lines) and not tail:
                break  # the last line, cut short by a crash: never acknowledged
            raise ValueError(f"{LOG_FILE} line {number} is damaged")
        records.append(record)
        intact_size += len(line) + 1
    # A non-empty tail lacks its newline, so it was cut short too.
    return records, intact_size, len(data)


def _encode_vectors(vectors):
    return base64.b64encode(vectors.astype("<f4").tobytes()).decode("ascii")


def _decode_vectors(text, count, dim):
    raw = base64.b64decode(text, validate=True)
    if len(raw) != count * dim * 4:
        raise ValueError(f"{len(raw)} bytes of embeddings for {count} x {dim} floats")
    return np.frombuffer(raw, "<f4").astype(np.float32).reshape(count, dim)


def _logged_strings(values):
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("expected a list of strings")
    return values


def _replayed(state, manifest, records):
    """`state` and `manifest` with the logged changes applied.

    Folds the log into one set of net changes first, so a long log costs
    one state rebuild rather than one per record.
    """
    changes = {}

    def is_live(key):
        return changes[key] is not None if key in changes else state.locate(key) is not None

    for number, record in enumerate(records, 1):
        op = record.get("op")
        try:
            if op == "upsert":
                keys = _logged_strings(record["keys"])
                vectors = _decode_vectors(record["embeddings"], len(keys), state.dim)
                sources = record["sources"]
                if sources is not None:
                    if len(_logged_strings(sources)) != len(keys):
                        raise ValueError("not one source per key")
                    # As upsert did: the net changes are applied to this.
                    state = state.recording_sources()
                for row, key in enumerate(keys):
                    changes.pop(key, None)
                    changes[key] = (vectors[row], sources[row] if sources else None)
            elif op == "delete":
                for key in _logged_strings(record["keys"]):
                    if not is_live(key):
                        raise ValueError(f"deletes {key!r}, which is not in the index")
                    changes.pop(key, None)
                    changes[key] = None
            elif op == "manifest":
                updates = record["updates"]
                if not isinstance(updates, dict) or CORE_MANIFEST_KEYS.intersection(updates):
                    raise ValueError("bad manifest updates")
                manifest = {**manifest, **updates}
            else:
                raise ValueError(f"unknown op {op!r}")
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(f"{LOG_FILE} record {number}: {error}") from None
    if changes:
        state = state.with_changes(changes)
    return state, manifest


def _corrupt(directory, problem):
    return JaxRetrievalError(
        f"the index at {directory} is corrupt ({problem}): {REBUILD_HINT}")


def _read_snapshot(directory, version):
    """(state, manifest) of one snapshot, or of a format 1 directory (version None)."""
    folder = _snapshot_folder(directory, version)
    prefix = "" if version is None else f"{SNAPSHOTS_DIR}/{version}/"

    def require(relative_path):
        path = os.path.join(folder, relative_path)
        if not os.path.isfile(path):
            raise JaxRetrievalError(
                f"the index at {directory} is incomplete ({prefix}{relative_path} "
                f"is missing): {REBUILD_HINT}")
        return path

    def corrupt(problem):
        return _corrupt(directory, problem)

    manifest_path = require(MANIFEST_FILE)
    keys_path = require(KEYS_FILE)
    embeddings_path = require(EMBEDDINGS_FILE)
    try:
        manifest = _read_json(manifest_path)
        keys = _read_json(keys_path)
    except (ValueError, UnicodeDecodeError) as error:
        raise corrupt(f"unreadable JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise corrupt(f"{MANIFEST_FILE} is not a JSON object")

    format_version = manifest.get("format_version")
    if (not isinstance(format_version, int) or isinstance(format_version, bool)
            or format_version < 1):
        raise corrupt(f"format_version is {format_version!r}")
    if format_version > FORMAT_VERSION:
        raise JaxRetrievalError(
            f"the index at {directory} has format_version {format_version}, but "
            f"this jaxretrieval reads only up to {FORMAT_VERSION}: upgrade "
            f"jaxretrieval or {REBUILD_HINT}")
    missing = sorted(CORE_MANIFEST_KEYS - manifest.keys())
    if missing:
        raise corrupt(f"manifest lacks {', '.join(missing)}")

    count = manifest["count"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise corrupt(f"{KEYS_FILE} is not a list of strings")
    if len(keys) != count:
        raise corrupt(f"manifest count is {count} but there are {len(keys)} keys")
    sources = None
    sources_path = os.path.join(folder, SOURCES_FILE)
    if os.path.isfile(sources_path):
        try:
            sources = _read_json(sources_path)
        except (ValueError, UnicodeDecodeError) as error:
            raise corrupt(f"unreadable JSON: {error}") from None
        if (not isinstance(sources, list) or len(sources) != count
                or not all(isinstance(s, str) for s in sources)):
            raise corrupt(f"{SOURCES_FILE} is not a list of {count} strings")

    try:
        embeddings = np.load(embeddings_path, allow_pickle=False)
    except ValueError as error:
        raise corrupt(f"unreadable {EMBEDDINGS_FILE}: {error}") from None
    expected_shape = (count, manifest["embedding_dim"])
    if embeddings.dtype != np.float32 or embeddings.shape != expected_shape:
        raise corrupt(
            f"{EMBEDDINGS_FILE} is {embeddings.dtype} {embeddings.shape}, "
            f"expected float32 {expected_shape}")
    settings = manifest["scann"]
    if not isinstance(settings, dict) or settings.get("mode") not in ("exact", "tree_ah"):
        raise corrupt(f"unknown ScaNN settings {settings!r}")

    searcher = None
    # Every change can be deleted away; an empty snapshot has no searcher.
    if count:
        require(os.path.join(SCANN_DIR, SCANN_ASSETS_FILE))
        try:
            searcher = _load_searcher(os.path.join(folder, SCANN_DIR))
        except (OSError, RuntimeError, ValueError) as error:
            raise corrupt(f"ScaNN could not load its assets: {error}") from None
        if searcher.size() != count:
            raise corrupt(
                f"the ScaNN searcher holds {searcher.size()} items, expected {count}")
    try:
        state = _State.from_rows(embeddings, keys, sources,
                                 has_sources=sources is not None,
                                 searcher=searcher, settings=settings)
    except JaxRetrievalError as error:
        raise corrupt(str(error)) from None
    return state, manifest


def _read_index(directory):
    """(state, manifest, version, log) of the index at `directory`, log replayed.

    `log` is (path, bytes of intact lines, file size), or None for format 1.
    """
    for attempt in range(LOAD_ATTEMPTS):
        version = _read_current(directory)
        try:
            state, manifest = _read_snapshot(directory, version)
            if version is None:
                return state, manifest, None, None
            log_path = os.path.join(_snapshot_folder(directory, version), LOG_FILE)
            try:
                records, intact_size, size = _read_log(log_path)
                state, manifest = _replayed(state, manifest, records)
            except ValueError as error:
                raise _corrupt(directory, f"{SNAPSHOTS_DIR}/{version}/{error}") from None
            if state.compaction_due():
                # A long log left a big delta: rebuild now rather than scan
                # it exhaustively in every search.
                state = state.compacted()
            return state, manifest, version, (log_path, intact_size, size)
        except (JaxRetrievalError, OSError):
            # A writer deleted this snapshot while we read it: start again
            # from the newer one CURRENT names now.
            if attempt + 1 == LOAD_ATTEMPTS or _read_current(directory) == version:
                raise


def _check_expected(directory, manifest, expected):
    mismatches = [
        f"{key} is {manifest.get(key)!r} in the index but {value!r} is expected"
        for key, value in (expected or {}).items()
        if manifest.get(key) != value
    ]
    if mismatches:
        raise JaxRetrievalError(
            f"the index at {directory} does not match the current model: "
            f"{'; '.join(mismatches)}. Rebuild the index with "
            "`python -m train --eval_only --workdir DIR` "
            "(DIR is the training workdir)")


def _checked_target_recall(target):
    value = math.nan
    if not isinstance(target, bool):
        try:
            value = float(target)
        except (TypeError, ValueError):
            pass
    if not 0.0 < value <= 1.0:  # NaN fails this too
        raise JaxRetrievalError(
            f"target_recall must be a number in (0, 1], e.g. 0.95, got {target!r}")
    return value


def _checked_rows(embeddings, keys, sources, dim=None):
    """(embeddings, keys, sources) to build or upsert, checked: one unique key (and
    source) per row of unit vectors (of `dim` dimensions, when given)."""
    embeddings = _checked_embeddings(embeddings, index_dim=dim)
    keys = _checked_strings(keys, len(embeddings), "keys")
    _row_by_key(keys)
    if sources is not None:
        sources = _checked_strings(sources, len(keys), "sources")
    return embeddings, keys, sources


def _checked_positive_int(value, what):
    if isinstance(value, bool):
        raise JaxRetrievalError(f"{what} must be an integer >= 1, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise JaxRetrievalError(f"{what} must be an integer >= 1, got {value!r}") from None
    if value < 1:
        raise JaxRetrievalError(f"{what} must be an integer >= 1, got {value}")
    return value


def _exact_kth_scores(vectors, queries, k, self_rows=None):
    """The k-th best exact score of each query over `vectors`.

    With `self_rows`, query i does not match row self_rows[i] (itself).
    """
    best = np.full((len(queries), k), -np.inf, np.float32)
    for start in range(0, len(vectors), EXACT_BLOCK_ROWS):
        scores = queries @ vectors[start:start + EXACT_BLOCK_ROWS].T
        if self_rows is not None:
            inside = (self_rows >= start) & (self_rows < start + len(scores[0]))
            scores[np.flatnonzero(inside), self_rows[inside] - start] = -np.inf
        scores = np.concatenate([best, scores], axis=1)
        best = -np.partition(-scores, k - 1, axis=1)[:, :k]
    return best.min(axis=1)


class _TuningSet:
    """Queries, their exact k-th scores and (for gallery rows) their own rows."""

    def __init__(self, vectors, queries, k, self_rows):
        # The live gallery in live-row order: every trial state shares its rows.
        self.vectors = vectors
        self.queries = queries
        self.self_rows = self_rows
        self.k = k
        self.kth_scores = _exact_kth_scores(vectors, queries, k, self_rows)

    def __len__(self):
        return len(self.queries)

    def recall(self, state):
        """(mean recall, mean less TUNE_CONFIDENCE_Z standard errors)."""
        per_query = self.recall_per_query(state)
        mean = float(per_query.mean())
        if len(per_query) < 2:
            return mean, mean
        error = float(per_query.std(ddof=1)) / math.sqrt(len(per_query))
        return mean, mean - TUNE_CONFIDENCE_Z * error

    def recall_per_query(self, state):
        """Recall@k of each query searched in `state`, against the exact k-th scores.

        A result is a hit when its exact score reaches the query's k-th best
        exact score. With `self_rows` (queries taken from the gallery), each
        query's own row is left out of its results, as it was of the truth.
        """
        k = self.k
        want = k if self.self_rows is None else k + 1
        ids, _ = state.search_ids(self.queries, want)
        rows = state.live_rows(ids)
        if self.self_rows is not None:
            drop = rows == self.self_rows[:, np.newaxis]
            drop[~drop.any(axis=1), -1] = True
            rows = rows[~drop].reshape(len(self.queries), k)
        scores = np.einsum("ij,ikj->ik", self.queries, self.vectors[np.maximum(rows, 0)])
        hits = (rows >= 0) & (scores >= self.kth_scores[:, np.newaxis] - RECALL_SCORE_TOLERANCE)
        return hits.sum(axis=1) / k

    def seconds_per_query(self, state):
        """The fastest of TUNE_TIMING_REPEATS searches of these queries, per query."""
        want = self.k if self.self_rows is None else self.k + 1
        best = math.inf
        for _ in range(TUNE_TIMING_REPEATS):
            start = time.perf_counter()
            state.search_ids(self.queries, want)
            best = min(best, time.perf_counter() - start)
        return best / len(self.queries)


def _fewest_leaves(reaches, num_leaves):
    """The smallest leaf count in 1..num_leaves for which `reaches` holds, or None.

    Recall grows with the leaves searched, so: doubling, then bisection.
    """
    low, high = 0, 1  # reaches(low) is false (or low is 0)
    while not reaches(high):
        if high == num_leaves:
            return None
        low, high = high, min(2 * high, num_leaves)
    while high - low > 1:
        middle = (low + high) // 2
        if reaches(middle):
            high = middle
        else:
            low = middle
    return high


class _KeySet(collections.abc.Set):
    """The live keys of one state, without building a set of them."""

    def __init__(self, state):
        self._state = state

    def __contains__(self, key):
        return isinstance(key, str) and self._state.locate(key) is not None

    def __iter__(self):
        return iter(self._state.keys)

    def __len__(self):
        return self._state.count


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
        self._version = None
        self._log = None
        self._log_size = 0
        self._writer_lock = None
        self._closed = False

    @classmethod
    def build(cls, embeddings, keys, *, sources=None, checkpoint_step,
              model_config_hash, extra_manifest=None):
        """Indexes L2-normalised float32 `embeddings` [n, d] under `keys`.

        `sources` optionally names where each row came from. Galleries of
        more than EXACT_SEARCH_MAX_COUNT items get approximate search.
        """
        embeddings, keys, sources = _checked_rows(embeddings, keys, sources)
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
        extra = _checked_manifest_updates(extra_manifest or {}, "extra_manifest")

        state = _State.from_rows(embeddings, keys, sources,
                                 has_sources=sources is not None)
        manifest = {
            "format_version": FORMAT_VERSION,
            "embedding_dim": dim,
            "count": count,
            "checkpoint_step": checkpoint_step,
            "model_config_hash": model_config_hash,
            "scann_version": _scann_version(),
            "distance": DISTANCE,
            "scann": state.settings,
            **extra,
        }
        return cls(state, manifest)

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
        return _KeySet(self._state)

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

    def update_manifest(self, **updates):
        """Adds or replaces manifest entries, e.g. `match_thresholds={...}`.

        Values must be JSON-serialisable. A writable index logs them; others
        keep them until `save`.
        """
        updates = _checked_manifest_updates(updates, "update_manifest")
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

    def upsert(self, keys, embeddings, sources=None):
        """Adds items, replacing those whose key is already in the index.

        `embeddings` are L2-normalised float32 [n, d], one row per key;
        `sources`, if given, one string per key (without them, items record
        source ""). Searches see the change on return; on a writable index
        it is also on disk by then.
        """
        embeddings, keys, sources = _checked_rows(embeddings, keys, sources,
                                                  self.embedding_dim)
        with self._lock:
            self._check_open()
            if not keys:
                return
            state = self._state
            if sources is not None:
                state = state.recording_sources()
            new_state = state.with_changes({
                key: (embeddings[row], sources[row] if sources else None)
                for row, key in enumerate(keys)})
            self._append_to_log({"op": "upsert", "keys": keys,
                                 "embeddings": _encode_vectors(embeddings),
                                 "sources": sources})
            self._install(new_state)

    def delete(self, keys):
        """Removes the items with these keys; unknown keys are an error.

        Nothing is deleted if any key is unknown.
        """
        keys = _checked_string_list(keys, "keys")
        with self._lock:
            self._check_open()
            state = self._state
            _refuse_unknown_keys([key for key in keys if state.locate(key) is None])
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
        target = _checked_target_recall(target_recall)
        k = _checked_positive_int(k, "k")
        sample = _checked_positive_int(sample, "sample")
        with self._lock:
            state = self._state
            settings = state.settings
            if settings["mode"] != "tree_ah":
                return {"mode": settings["mode"], "tuned": False,
                        "message": "this index searches exactly (recall 1): "
                                   "there is nothing to tune"}
            tuning, validation, source = self._tuning_sets(state, queries, k, sample,
                                                           seed)
            k = tuning.k
            chosen, candidates = self._cheapest_setting(state, tuning, target)
            trial = state.with_settings(chosen)
            tuning_recall = tuning.recall(trial)[0]
            validation_recall = validation.recall(trial)[0]
            record = _json_normalised({
                "target_recall": target, "k": k, "queries": source,
                "tuning_queries": len(tuning), "tuning_recall": tuning_recall,
                "validation_queries": len(validation),
                "validation_recall": validation_recall,
            }, "tuning record")
            self._state = state.with_settings({**chosen, "tuned": record})
        logger.info("tuned the index for recall@%d >= %s: %d of %d leaves, reordering "
                    "%d; recall %.4f (tuning), %.4f (validation)", k, target,
                    chosen["num_leaves_to_search"], chosen["num_leaves"],
                    chosen["reorder_num_neighbors"], tuning_recall, validation_recall)
        return {"mode": "tree_ah", "tuned": True, **record,
                "num_leaves": chosen["num_leaves"],
                "num_leaves_to_search": chosen["num_leaves_to_search"],
                "reorder_num_neighbors": chosen["reorder_num_neighbors"],
                "candidates": candidates}

    def _tuning_sets(self, state, queries, k, sample, seed):
        """(tuning set, validation set, "gallery" or "given") for `tune`."""
        rng = np.random.default_rng(seed)
        if queries is None:
            count = state.count
            # Each query leaves itself out, so k + 1 rows must be there.
            k = min(k, count - 1)
            each = min(sample, count // 2)
            if k < 1 or each < 1:
                raise JaxRetrievalError(
                    f"tuning needs at least 2 gallery items, this index has {count}")
            rows = rng.choice(count, 2 * each, replace=False)
            vectors = state.live_vectors()
            chosen = vectors[rows]
            return (_TuningSet(vectors, chosen[:each], k, rows[:each]),
                    _TuningSet(vectors, chosen[each:], k, rows[each:]), "gallery")
        queries = self._checked_queries(queries, state.dim)
        if len(queries) < 2:
            raise JaxRetrievalError(
                f"tuning needs at least 2 queries (half to tune on, half to check "
                f"the choice), got {len(queries)}")
        k = min(k, state.count)
        order = rng.permutation(len(queries))
        each = min(sample, len(queries) // 2)
        vectors = state.live_vectors()
        return (_TuningSet(vectors, queries[order[:each]], k, None),
                _TuningSet(vectors, queries[order[each:2 * each]], k, None), "given")

    @staticmethod
    def _cheapest_setting(state, tuning, target):
        """(settings, timed candidates): the fastest setting reaching `target`."""
        settings = state.settings
        num_leaves = settings["num_leaves"]
        want = tuning.k if tuning.self_rows is None else tuning.k + 1
        reorders = sorted({reorder for reorder in (want, *TUNE_REORDER_CANDIDATES)
                           if want <= reorder <= state.count})
        measured = {}

        def trial(leaves, reorder):
            return state.with_settings({**settings, "num_leaves_to_search": leaves,
                                        "reorder_num_neighbors": reorder})

        def recall(leaves, reorder):
            if (leaves, reorder) not in measured:
                measured[leaves, reorder] = tuning.recall(trial(leaves, reorder))
            return measured[leaves, reorder]

        candidates = []
        for reorder in reorders:
            leaves = _fewest_leaves(lambda n: recall(n, reorder)[1] >= target, num_leaves)
            if leaves is None:
                continue
            candidates.append({
                "num_leaves_to_search": leaves, "reorder_num_neighbors": reorder,
                "tuning_recall": recall(leaves, reorder)[0],
                "seconds_per_query": tuning.seconds_per_query(trial(leaves, reorder))})
            if leaves == 1:
                break  # more reordering would only cost more
        if not candidates:
            best_recall = max(mean for mean, _ in measured.values())
            raise JaxRetrievalError(
                f"no search setting reaches recall@{tuning.k} of {target} on "
                f"{len(tuning)} tuning queries: the best measured was "
                f"{best_recall:.4f} (all {num_leaves} leaves, reordering up to "
                f"{reorders[-1]}); ask for a lower target_recall")
        best = min(candidates, key=lambda candidate: candidate["seconds_per_query"])
        return ({**settings, "num_leaves_to_search": best["num_leaves_to_search"],
                 "reorder_num_neighbors": best["reorder_num_neighbors"]}, candidates)

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
        line = _encode_log_record(record)
        try:
            written = 0
            while written < len(line):
                written += self._log.write(line[written:])
            os.fsync(self._log.fileno())
        except BaseException:
            # A partial line would make every later record unreadable:
            # cut it off, or stop logging if even that fails.
            try:
                os.ftruncate(self._log.fileno(), self._log_size)
                os.fsync(self._log.fileno())
            except OSError:
                self._release()
                self._closed = True
            raise
        self._log_size += len(line)

    def _checked_queries(self, queries, dim):
        array = _as_float_matrix(queries, "queries")
        if array.ndim == 1:
            array = array[np.newaxis, :]
        if array.ndim != 2:
            raise JaxRetrievalError(
                f"queries must have shape [m, {dim}] or [{dim}], got shape "
                f"{array.shape}")
        if array.shape[1] != dim:
            raise JaxRetrievalError(
                f"queries have dimension {array.shape[1]} but the index has "
                f"dimension {dim}; embed queries with the same "
                "model that built the index")
        _check_finite(array, "queries")
        return np.ascontiguousarray(array)

    @staticmethod
    def _clipped_k(k, count):
        return min(_checked_positive_int(k, "k"), count)

    def _search_ids(self, state, queries, k):
        queries = self._checked_queries(queries, state.dim)
        k = self._clipped_k(k, state.count)
        if queries.shape[0] == 0 or k == 0:
            # ScaNN rejects an empty batch.
            return (np.zeros((queries.shape[0], k), np.int64),
                    np.zeros((queries.shape[0], k), np.float32))
        return state.search_ids(queries, k)

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

    def search(self, queries, k, *, threshold=None):
        """The best keys and scores for each query, best first.

        Returns (keys, scores): per query, lists of up to min(k, count)
        strings and Python floats. With `threshold`, results scoring below
        it are dropped.
        """
        if threshold is not None:
            try:
                threshold_value = float(threshold)
            except (TypeError, ValueError):
                threshold_value = math.nan
            if math.isnan(threshold_value):
                raise JaxRetrievalError(
                    f"threshold must be a number or None, got {threshold!r}")
            threshold = threshold_value
        state = self._state
        ids, scores = self._search_ids(state, queries, k)
        all_keys, all_scores = [], []
        for query_ids, query_scores in zip(ids.tolist(), scores.tolist()):
            found_keys, found_scores = [], []
            for item_id, score in zip(query_ids, query_scores):
                if item_id < 0 or (threshold is not None and score < threshold):
                    continue
                found_keys.append(state.key_of(item_id))
                found_scores.append(score)
            all_keys.append(found_keys)
            all_scores.append(found_scores)
        return all_keys, all_scores

    def _compacted_for_saving(self):
        # Called with self._lock held. A snapshot holds one searcher over
        # exactly the live rows; keep it, as it is the one to search now.
        self._state = self._state.compacted()
        manifest = {**self._manifest, "count": self._state.count,
                    "scann": self._state.settings}
        return self._state, manifest

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
        # A directory left mid-swap by format 1's save is put back first.
        recover_interrupted_swap(directory)
        if os.path.lexists(directory):
            if not os.path.isdir(directory):
                raise JaxRetrievalError(
                    f"cannot save the index to {directory}: it exists and is "
                    "not a directory; choose another path or remove it")
            if not _is_index_directory(directory):
                # Refuse to write into, and later clean up, something not ours.
                raise JaxRetrievalError(
                    f"cannot save the index to {directory}: it is a non-empty "
                    "directory without an index in it; choose another path "
                    "or empty it")
            created = False
        else:
            os.makedirs(directory)
            created = True
        with _saving_into(directory, created):
            with self._lock:
                state, manifest = self._compacted_for_saving()
                version, previous = _write_snapshot(directory, state, manifest)
            _finish_switch(directory, version, previous)

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
            state, manifest = self._compacted_for_saving()
            version, previous = _write_snapshot(self._directory, state, manifest)
            # CURRENT names the new snapshot now; log there from here on.
            self._open_log(version)
            _finish_switch(self._directory, version, previous)

    def _open_log(self, version):
        path = os.path.join(_snapshot_folder(self._directory, version), LOG_FILE)
        log = open(path, "ab", buffering=0)
        if self._log is not None:
            self._log.close()
        self._log, self._version = log, version
        self._log_size = os.fstat(log.fileno()).st_size

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

    @classmethod
    def load(cls, directory, *, expected=None, writable=False):
        """Loads the index saved at `directory`, replaying its log of changes.

        `expected` maps manifest keys (e.g. embedding_dim, model_config_hash,
        checkpoint_step) to the values the caller needs; any difference is
        an error telling the user to rebuild the index.

        With `writable=True` this process becomes the directory's one
        writer until `close()`: `upsert`, `delete` and `update_manifest`
        are logged durably before they return, and `snapshot()` works.
        """
        directory = os.path.abspath(os.fspath(directory))
        # A directory left mid-swap by format 1's save is put back first.
        recover_interrupted_swap(directory)
        if not os.path.isdir(directory):
            raise JaxRetrievalError(
                f"no index at {directory}: build it with "
                "`python -m train --eval_only --workdir DIR` "
                "(DIR is the training workdir)")
        if os.path.isfile(os.path.join(directory, SHARDS_FILE)):
            raise JaxRetrievalError(
                f"the index at {directory} is sharded ({SHARDS_FILE}): open it with "
                "jaxretrieval.sharded_index.open_index(DIRECTORY), which opens either layout")
        if not writable:
            state, manifest, _, _ = _read_index(directory)
            index = cls(state, manifest)
            _check_expected(directory, index.manifest, expected)
            return index

        writer_lock = _WriterLock(directory)
        try:
            state, manifest, version, log = _read_index(directory)
            index = cls(state, manifest)
            _check_expected(directory, index.manifest, expected)
            index._directory = directory
            if version is None:
                # Convert format 1: a snapshot to log beside.
                version, previous = _write_snapshot(directory, state, manifest)
                index._open_log(version)
                _finish_switch(directory, version, previous)
            else:
                log_path, intact_size, size = log
                if size > intact_size:
                    # Drop the line a crash cut short, or the next record
                    # would be appended to it and read as damaged.
                    with open(log_path, "r+b") as file:
                        file.truncate(intact_size)
                        os.fsync(file.fileno())
                index._open_log(version)
                _fsync_path(os.path.dirname(log_path))  # in case it was created
        except BaseException:
            writer_lock.release()
            raise
        index._writer_lock = writer_lock
        return index
