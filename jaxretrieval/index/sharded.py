"""An index split by key over S shards, each an ordinary `Index`, searched together.

An item lives in shard `zlib.crc32(key as UTF-8) % S` (`shard_of`): stable across
machines, processes and Python versions, unlike `hash()`. A search asks every shard for
its best k and merges them by score, equal scores by key. A filtered search does the same:
each shard returns its best k passing items, so the merge holds the best k passing overall.

With exact scoring (at most EXACT_SEARCH_MAX_COUNT items) the results, keys and scores,
are those of one Index over the same vectors and changes, with two exceptions that come
from ScaNN: items whose scores are exactly equal come in key order here and in row order
there; and a batch of one query goes through ScaNN's one-query kernel, whose rounding
depends on where an item sits in its searcher, so its scores can differ in the last bit
(batches of two or more use a kernel that does not).

On-disk layout of a sharded index directory:

    shards.json                       the manifest: format_version, num_shards, routing,
                                      generation, shards (the folder names, relative),
                                      embedding_dim, model_config_hash, checkpoint_step,
                                      scann_version, distance and the extra entries
                                      (match_thresholds, dataset, data_dir, source_roots, ...)
    LOCK                              held (flock) by the one writer, as for an Index
    shards/<generation>/shard-00000-of-00004/   one complete Index directory per shard
    ...
    damaged-logs/                     copies of damaged log lines, never deleted (as
                                      for an Index; jaxretrieval.index.storage)

`open_index` opens either layout: with shards.json (storage.is_sharded) the directory is
sharded, without it it is a plain Index directory (CURRENT, snapshots/).

The switch rule. Every save, whatever the layout before and after (flat to sharded,
sharded to flat, S shards to S'), writes the new parts completely and fsyncs them first,
beside the old ones and under names nothing references yet (a new generation of shard
folders, or a new flat snapshot), then switches with one atomic step, then removes what
is no longer referenced:

- to sharded: shards.json is replaced atomically (rename) to name the new generation;
  then the flat layout (CURRENT, snapshots/) and all generations but the new one and
  the previous one are removed;
- to flat: Index's own snapshot writer writes snapshots/<version> and CURRENT while
  shards.json still decides, then shards.json is removed; then shards/ is removed.

A reader therefore sees the old whole index or the new whole index, never a mix; one that
loses a race with the clean-up starts again from what the directory names now. A save
that fails before its switch leaves the old index as it was.

A writable ShardedIndex holds the directory's LOCK and each shard's. Its updates are
logged by the shards they route to, so a change is durable and atomic per shard; a
batch spanning several shards that is cut short by a crash may survive in some of them.
Manifest updates are written to shards.json (atomically) and to every shard.
"""

import collections.abc
import concurrent.futures
import copy
import operator
import os
import shutil
import threading
import zlib

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import storage
from jaxretrieval.index.checks import (as_float_matrix, checked_manifest_updates, checked_rows,
                                       checked_string_list, refuse_reserved_keys,
                                       refuse_unknown_keys)
from jaxretrieval.index.flat import Index
from jaxretrieval.index.metadata import checked_filter, checked_metadata_list
from jaxretrieval.index.precision import DEFAULT as DEFAULT_EMBEDDING_DTYPE
from jaxretrieval.index.precision import checked_dtype, dtype_of
from jaxretrieval.index.storage import SHARDS_DIR, SHARDS_FILE, UnreadableIndexError
from jaxretrieval.fileio import recover_interrupted_swap, write_json_atomically

FORMAT_VERSION = 1
ROUTING = "crc32(utf-8 key) % num_shards"
# A writable shard holds two open files (its log and its lock): this many stay well
# inside the usual limit of 1024.
MAX_NUM_SHARDS = 256
# Below this many items a shard answers in tens of microseconds, less than a thread hop.
PARALLEL_SEARCH_MIN_COUNT = 20_000

# Per shard, so not part of the sharded manifest.
PER_SHARD_KEYS = frozenset({"format_version", "count", "scann"})
# What a shard must agree on with shards.json.
IDENTITY_KEYS = ("embedding_dim", "model_config_hash", "checkpoint_step", "distance")
# Kept by the sharded index itself; callers may add any other manifest entries.
SHARDED_KEYS = frozenset({"num_shards", "routing", "generation", "shards", "shard_counts"})
REQUIRED_KEYS = frozenset({"format_version", "num_shards", "routing", "generation", "shards",
                           "embedding_dim", "model_config_hash", "checkpoint_step"})


def shard_of(key, num_shards):
    """The shard that holds `key`: crc32 of its UTF-8 bytes modulo `num_shards`."""
    # surrogatepass: a lone surrogate (valid in a Python str, e.g. from JSON) still routes.
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % num_shards


def merge_results(results, k):
    """One search's answer from every shard's: `results` holds one (keys, scores) or (keys,
    scores, metadata) tuple per shard, each with a list per query; per query, the best k over
    all shards, by score and equal scores by key, as tuples of the same form."""
    k = operator.index(k)
    merged = [[] for _ in results[0]]
    for per_shard in zip(*(zip(*result) for result in results)):
        hits = sorted((hit for columns in per_shard for hit in zip(*columns)),
                      key=lambda hit: (-hit[1], hit[0]))[:k]
        for column, values in zip(merged, zip(*hits) if hits else [()] * len(merged)):
            column.append(list(values))
    return tuple(merged)


def checked_num_shards(num_shards):
    """`num_shards` as an int in 1..MAX_NUM_SHARDS, or a JaxRetrievalError."""
    try:
        value = None if isinstance(num_shards, bool) else operator.index(num_shards)
    except TypeError:
        value = None
    if value is None or not 1 <= value <= MAX_NUM_SHARDS:
        raise JaxRetrievalError(
            f"the number of shards must be an integer from 1 to {MAX_NUM_SHARDS}, "
            f"got {num_shards!r}")
    return value


def _corrupt(directory, problem, num_shards="S"):
    return storage.corrupt(directory, problem, num_shards)


def _shard_names(generation, num_shards):
    return [f"{SHARDS_DIR}/{generation}/shard-{number:05d}-of-{num_shards:05d}"
            for number in range(num_shards)]


def _rows_by_shard(keys, num_shards):
    rows = [[] for _ in range(num_shards)]
    for row, key in enumerate(keys):
        rows[shard_of(key, num_shards)].append(row)
    return rows


def _refuse_sharded_keys(updates, what):
    refuse_reserved_keys(updates, SHARDED_KEYS, what, owner="sharded index")


def _build_shard(embeddings, keys, sources, metadata, rows, identity):
    empty = not rows
    if empty:
        # Index.build refuses an empty gallery (ScaNN cannot index nothing): build the
        # first item alone and delete it, which leaves an empty, searchable index.
        rows = [0]
    shard = Index.build(embeddings[rows], [keys[row] for row in rows],
                        sources=None if sources is None else [sources[row] for row in rows],
                        metadata=None if metadata is None else [metadata[row] for row in rows],
                        **identity)
    if empty:
        shard.delete([keys[0]])
        shard.compact()
    return shard


def _read_layout(directory):
    """The checked contents of shards.json, or None when the directory is not sharded."""
    path = os.path.join(directory, SHARDS_FILE)
    try:
        layout = storage.read_json(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as error:
        raise _corrupt(directory, f"unreadable {SHARDS_FILE}: {error}") from None
    if not isinstance(layout, dict):
        raise _corrupt(directory, f"{SHARDS_FILE} is not a JSON object")
    missing = sorted(REQUIRED_KEYS - layout.keys())
    if missing:
        raise _corrupt(directory, f"{SHARDS_FILE} lacks {', '.join(missing)}")
    format_version = layout["format_version"]
    if not isinstance(format_version, int) or isinstance(format_version, bool) \
            or format_version < 1:
        raise _corrupt(directory, f"{SHARDS_FILE} has format_version {format_version!r}")
    if format_version > FORMAT_VERSION:
        raise storage.too_new(directory, format_version, FORMAT_VERSION,
                              what="sharded index", num_shards="S")
    try:
        num_shards = checked_num_shards(layout["num_shards"])
    except JaxRetrievalError as error:
        raise _corrupt(directory, f"{SHARDS_FILE}: {error}") from None
    if layout["routing"] != ROUTING:
        raise _corrupt(directory, f"{SHARDS_FILE} routes by {layout['routing']!r}, "
                       f"not {ROUTING!r}", num_shards)
    generation = layout["generation"]
    # Checked against the names we write, so a damaged file cannot point elsewhere.
    if not (isinstance(generation, str) and storage.VERSION_PATTERN.fullmatch(generation)
            and layout["shards"] == _shard_names(generation, num_shards)):
        raise _corrupt(directory, f"{SHARDS_FILE} does not list the shard folders "
                       f"{SHARDS_DIR}/<generation>/shard-<i>-of-<num_shards>", num_shards)
    return layout


def shard_directories(directory):
    """The shard folders that shards.json at `directory` lists (checked), or None when the
    directory is not sharded."""
    layout = _read_layout(directory)
    if layout is None:
        return None
    return [os.path.join(directory, name) for name in layout["shards"]]


def num_shards_on_disk(directory):
    """How many shards the index saved at `directory` has: 1 when flat or absent."""
    try:
        layout = _read_layout(directory)
    except JaxRetrievalError:
        return 1  # a damaged layout is replaced by a rebuild, which starts from 1
    return 1 if layout is None else layout["num_shards"]


def embedding_dtype_on_disk(directory):
    """The precision (`embedding_dtype`) the index saved at `directory` stores its rows in:
    float32 when there is none, or none readable (a rebuild replaces a damaged one)."""
    try:
        layout = _read_layout(directory)
        # Every shard is built with the same dtype; the first one tells it.
        folder = directory if layout is None else os.path.join(directory, layout["shards"][0])
        manifest = storage.read_json(os.path.join(storage.snapshot_directory(folder),
                                                  storage.MANIFEST_FILE))
        return checked_dtype(dtype_of(manifest["scann"]))
    except (JaxRetrievalError, OSError, ValueError, LookupError, TypeError, AttributeError):
        return DEFAULT_EMBEDDING_DTYPE


def _current_generation(directory):
    layout = _read_layout(directory)
    return None if layout is None else layout["generation"]


def _load_shard(directory, name, num_shards, writable):
    path = os.path.join(directory, name)
    if not os.path.isdir(path):
        raise storage.incomplete(directory, f"shard folder {name}", num_shards)
    try:
        # Kept aside at the top, where no later save removes them with the shard's folder.
        return Index.load(path, writable=writable, damaged_logs=os.path.join(
            directory, storage.DAMAGED_LOGS_DIR))
    except UnreadableIndexError as error:
        # A shard is rebuilt with the sharded whole, not as a flat index.
        raise error.for_shards(num_shards) from None


def _check_shards(directory, manifest, shards, names):
    num_shards = len(shards)
    for number, (shard, name) in enumerate(zip(shards, names)):
        shard_manifest = shard.manifest
        for key in IDENTITY_KEYS:
            if shard_manifest.get(key) != manifest.get(key):
                raise UnreadableIndexError(
                    f"the index at {directory} is inconsistent ({name} has {key} "
                    f"{shard_manifest.get(key)!r} but {SHARDS_FILE} says "
                    f"{manifest.get(key)!r}): ", num_shards)
        stray = next((key for key in shard.keys if shard_of(key, num_shards) != number), None)
        if stray is not None:
            raise UnreadableIndexError(
                f"the index at {directory} is inconsistent ({name} holds key {stray!r}, "
                f"which belongs in shard {shard_of(stray, num_shards)}): ", num_shards)


def _load(directory, expected, writable, *, sharded_only):
    directory = os.path.abspath(os.fspath(directory))
    # A directory left mid-swap by a format 1 save is put back first, as Index.load does.
    recover_interrupted_swap(directory)

    def read(generation):
        if generation is not None:
            return ShardedIndex._open(directory, expected, writable)
        if sharded_only:
            raise JaxRetrievalError(
                f"no sharded index at {directory} (no {SHARDS_FILE}): "
                f"{storage.rebuild_hint('S', verb='build one')}, or open either layout "
                "with open_index")
        return Index.load(directory, expected=expected, writable=writable)

    # A save may switch layout or generation while we read and remove what we were reading.
    return storage.read_with_retry(read, lambda: _current_generation(directory))


def open_index(directory, *, expected=None, writable=False):
    """The index at `directory`: a ShardedIndex if it holds shards.json, else an Index.

    `expected` and `writable` mean what they mean for `Index.load`.
    """
    return _load(directory, expected, writable, sharded_only=False)


def save_index(index, directory):
    """Saves an Index or a ShardedIndex at `directory`, replacing whichever layout is there."""
    if isinstance(index, ShardedIndex):
        index.save(directory)
        return
    directory = os.path.abspath(os.fspath(directory))
    recover_interrupted_swap(directory)
    if not storage.is_sharded(directory):
        index.save(directory)
        return
    # Index.save refuses a directory that is not a flat index; the flat half of the switch
    # is its own snapshot writer, run here under the directory's writer lock.
    writer_lock = storage.WriterLock(directory)
    try:
        version, previous = index.write_snapshot(directory)
        os.remove(os.path.join(directory, SHARDS_FILE))  # the switch
        # Fsyncs the switch, then tidies the flat side.
        storage.finish_switch(directory, version, previous)
        _remove_sharded_layout(directory)
    finally:
        writer_lock.release()


def _remove_sharded_layout(directory):
    for name in os.listdir(directory):
        if name == SHARDS_DIR or name.startswith(f".{SHARDS_FILE}.tmp-"):
            storage.remove_leftover(os.path.join(directory, name))


def _remove_unreferenced(directory, keep):
    """After a switch to sharded: the flat layout, and generations not in `keep`."""
    storage.remove_flat_layout(directory)
    for name in os.listdir(directory):
        if name.startswith(f".{SHARDS_FILE}.tmp-"):
            storage.remove_leftover(os.path.join(directory, name))
    generations = os.path.join(directory, SHARDS_DIR)
    for name in os.listdir(generations):
        if name not in keep:
            storage.remove_leftover(os.path.join(generations, name))


def _next_generation(directory, previous):
    generations = os.path.join(directory, SHARDS_DIR)
    os.makedirs(generations, exist_ok=True)
    return storage.next_numbered_name(generations, previous)


def _write_layout(directory, generation, manifest):
    write_json_atomically(os.path.join(directory, SHARDS_FILE), {
        **manifest, "generation": generation,
        "shards": _shard_names(generation, manifest["num_shards"])})
    storage.fsync_path(directory)


class _ShardedKeySet(collections.abc.Set):
    """The live keys, as each shard held them when the set was made."""

    def __init__(self, key_sets):
        self._key_sets = key_sets

    def __contains__(self, key):
        return isinstance(key, str) and key in self._key_sets[shard_of(key, len(self._key_sets))]

    def __iter__(self):
        for key_set in self._key_sets:
            yield from key_set

    def __len__(self):
        return sum(len(key_set) for key_set in self._key_sets)


class ShardedIndex:
    """S ordinary Index shards, items routed by `shard_of(key, S)`, searched together.

    It answers like an Index: make one with `ShardedIndex.build`, `ShardedIndex.load` or
    `open_index`. Searches may run in many threads at once, beside one thread changing it.
    """

    def __init__(self, shards, manifest):
        self._shards = tuple(shards)
        # Replaced, never modified in place, so readers need no lock.
        self._manifest = manifest
        # Serialises changes, saves and close; searches never take it.
        self._lock = threading.Lock()
        self._records_sources = any(shard.sources is not None for shard in self._shards)
        self._directory = None  # set while open for writing
        self._generation = None
        self._writer_lock = None
        self._closed = False
        # Threads start on first use only (large indexes; see PARALLEL_SEARCH_MIN_COUNT).
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(len(self._shards), os.cpu_count() or 1),
            thread_name_prefix="shard-search")

    @classmethod
    def build(cls, embeddings, keys, *, sources=None, checkpoint_step, model_config_hash,
              extra_manifest=None, scann_overrides=None, num_shards, metadata=None,
              embedding_dtype="float32"):
        """As `Index.build`, split into `num_shards` shards by `shard_of(key, num_shards)`.

        Each shard chooses its ScaNN settings for its own size (with `scann_overrides`),
        and stores its rows in `embedding_dtype`.
        """
        # Checked here with the very checks Index.build runs, so errors number rows across
        # the whole gallery; each shard's Index.build checks the rest.
        embeddings, keys, sources = checked_rows(embeddings, keys, sources)
        metadata = checked_metadata_list(metadata, len(keys))
        num_shards = checked_num_shards(num_shards)
        _refuse_sharded_keys(extra_manifest or {}, "extra_manifest")
        identity = {"checkpoint_step": checkpoint_step, "model_config_hash": model_config_hash,
                    "extra_manifest": extra_manifest, "scann_overrides": scann_overrides,
                    "embedding_dtype": embedding_dtype}
        shards = [_build_shard(embeddings, keys, sources, metadata, rows, identity)
                  for rows in _rows_by_shard(keys, num_shards)]
        common = {key: value for key, value in shards[0].manifest.items()
                  if key not in PER_SHARD_KEYS}
        return cls(shards, {"format_version": FORMAT_VERSION, "num_shards": num_shards,
                            "routing": ROUTING, **common})

    @classmethod
    def load(cls, directory, *, expected=None, writable=False):
        """Loads the sharded index at `directory`, as `Index.load` loads a flat one."""
        return _load(directory, expected, writable, sharded_only=True)

    @classmethod
    def _open(cls, directory, expected, writable):
        writer_lock = storage.WriterLock(directory) if writable else None
        shards = []
        try:
            layout = _read_layout(directory)  # again: under the lock when writable
            if layout is None:
                raise JaxRetrievalError(f"the index at {directory} stopped being sharded "
                                        "while it was opened; open it again")
            num_shards = layout["num_shards"]
            manifest = {key: value for key, value in layout.items()
                        if key not in ("generation", "shards")}
            storage.check_expected(directory, manifest, expected, num_shards)
            for name in layout["shards"]:
                shards.append(_load_shard(directory, name, num_shards, writable))
            _check_shards(directory, manifest, shards, layout["shards"])
        except BaseException:
            for shard in shards:
                shard.close()
            if writer_lock is not None:
                writer_lock.release()
            raise
        index = cls(shards, manifest)
        if writable:
            index._directory, index._generation = directory, layout["generation"]
            index._writer_lock = writer_lock
        return index

    # ------------------------------------------------------------------ reading

    @property
    def shards(self):
        """The shards, shard i holding the keys with `shard_of(key, num_shards) == i`."""
        return self._shards

    @property
    def num_shards(self):
        return len(self._shards)

    @property
    def manifest(self):
        """A copy of the manifest dict, with the live `count` and `shard_counts`."""
        counts = [shard.count for shard in self._shards]
        return {**copy.deepcopy(self._manifest), "count": sum(counts), "shard_counts": counts}

    @property
    def count(self):
        return sum(shard.count for shard in self._shards)

    @property
    def embedding_dim(self):
        return self._manifest["embedding_dim"]

    @property
    def keys(self):
        """Every live key, shard after shard (a new list on each call)."""
        return [key for shard in self._shards for key in shard.keys]

    @property
    def sources(self):
        """The source of each key in `keys` order, or None if no item has one."""
        if not self._records_sources:
            return None
        return [source for shard in self._shards
                for source in (shard.sources or [""] * shard.count)]

    @property
    def keys_set(self):
        """The live keys as a read-only set: `key in index.keys_set` is O(1)."""
        return _ShardedKeySet(tuple(shard.keys_set for shard in self._shards))

    @property
    def writable(self):
        """True while changes are logged to a directory (see `load`)."""
        return self._writer_lock is not None

    def __contains__(self, key):
        return isinstance(key, str) and key in self._shard_for(key)

    def _shard_for(self, key):
        return self._shards[shard_of(key, len(self._shards))]

    def source_of(self, key):
        """As `Index.source_of`."""
        if not isinstance(key, str):
            raise JaxRetrievalError(f"key {key!r} is not in the index")
        source = self._shard_for(key).source_of(key)
        return "" if source is None and self._records_sources else source

    def metadata_of(self, key):
        """As `Index.metadata_of`."""
        if not isinstance(key, str):
            raise JaxRetrievalError(f"key {key!r} is not in the index")
        return self._shard_for(key).metadata_of(key)

    @property
    def has_metadata(self):
        """Whether any item carries metadata."""
        return any(shard.has_metadata for shard in self._shards)

    def filter_plan(self, filter, k=10):
        """As `Index.filter_plan`, over all shards: "strategy" is the shards' one when they
        agree, else "mixed"; "shards" lists each shard's plan."""
        plans = [shard.filter_plan(filter, k) for shard in self._shards]
        passing = sum(plan["passing"] for plan in plans)
        strategies = {plan["strategy"] for plan in plans}
        return {"passing": passing, "share": passing / max(1, self.count),
                "strategy": strategies.pop() if len(strategies) == 1 else "mixed",
                "shards": plans}

    def search(self, queries, k, *, threshold=None, filter=None, with_metadata=False):
        """As `Index.search`: per query, up to min(k, count) keys and scores (and with
        `with_metadata`, metadata), best first; `filter` as for `Index.search`.

        Exactly equal scores are ordered by key (which of them make the cut at k follows
        each shard's ScaNN order, by row).
        """
        queries = as_float_matrix(queries, "queries")
        checked_filter(filter)  # once here, so that a bad filter fails before any search
        # Each shard checks the queries, k and threshold as an Index does.
        results = self._on_every_shard(
            lambda shard: shard.search(queries, k, threshold=threshold, filter=filter,
                                       with_metadata=True))
        keys, scores, metadata = merge_results(results, k)
        return (keys, scores, metadata) if with_metadata else (keys, scores)

    def _on_every_shard(self, function):
        if len(self._shards) > 1 and self.count >= PARALLEL_SEARCH_MIN_COUNT:
            # ScaNN releases the GIL while it searches.
            return list(self._executor.map(function, self._shards))
        return [function(shard) for shard in self._shards]

    # ------------------------------------------------------------------ changing

    def _routed(self, keys):
        """(shard, rows of `keys` it holds) for every shard holding some."""
        return [(self._shards[number], rows)
                for number, rows in enumerate(_rows_by_shard(keys, len(self._shards))) if rows]

    def _check_open(self):
        if self._closed:
            raise JaxRetrievalError(
                "this index was closed, so changes would not be logged: open it again with "
                "open_index(directory, writable=True)")

    def upsert(self, keys, embeddings, sources=None, metadata=None):
        """As `Index.upsert`; each shard logs its part before the call returns."""
        embeddings, keys, sources = checked_rows(embeddings, keys, sources,
                                                  self.embedding_dim)
        metadata = checked_metadata_list(metadata, len(keys))
        with self._lock:
            self._check_open()
            for shard, rows in self._routed(keys):
                shard.upsert([keys[row] for row in rows], embeddings[rows],
                             None if sources is None else [sources[row] for row in rows],
                             None if metadata is None else [metadata[row] for row in rows])
            if sources is not None and keys:
                self._records_sources = True

    def delete(self, keys):
        """As `Index.delete`: unknown keys are an error, and then nothing is deleted."""
        keys = checked_string_list(keys, "keys")
        with self._lock:
            self._check_open()
            refuse_unknown_keys([key for key in keys if key not in self])
            for shard, rows in self._routed(keys):
                shard.delete([keys[row] for row in rows])

    def compact(self):
        """Rebuilds every shard's searcher over its live items (see `Index.compact`)."""
        with self._lock:
            for shard in self._shards:
                shard.compact()

    def update_manifest(self, **updates):
        """As `Index.update_manifest`; a writable index also rewrites shards.json."""
        updates = checked_manifest_updates(updates, "update_manifest")
        _refuse_sharded_keys(updates, "update_manifest")
        with self._lock:
            self._check_open()
            for shard in self._shards:
                shard.update_manifest(**updates)
            manifest = {**self._manifest, **updates}
            if self.writable:
                _write_layout(self._directory, self._generation, manifest)
            self._manifest = manifest

    def snapshot(self):
        """Snapshots every shard of a writable index (see `Index.snapshot`)."""
        with self._lock:
            self._check_open()
            if not self.writable:
                raise JaxRetrievalError(
                    "snapshot() needs an index opened with open_index(directory, "
                    "writable=True); use save(directory) for this one")
            # Contents do not change, so shards switching one by one is no mix.
            for shard in self._shards:
                shard.snapshot()

    def save(self, directory):
        """Writes the index to `directory` as a new generation of shards, replacing the
        index there (flat or sharded) by the switch rule of this module's docstring.

        If saving fails, an index already at `directory` is left as it was. On a writable
        index, saving to its own directory is `snapshot()`.
        """
        directory = os.path.abspath(os.fspath(directory))
        if self._directory is not None and os.path.realpath(directory) == os.path.realpath(
                self._directory):
            self.snapshot()
            return
        created = storage.prepare_directory(directory, any_layout=True)
        with storage.saving_into(directory, created), self._lock:
            self._save_locked(directory)

    def _save_locked(self, directory):
        try:
            previous = _current_generation(directory)
        except JaxRetrievalError:
            previous = None  # a damaged index is being replaced
        generation = _next_generation(directory, previous)
        folder = os.path.join(directory, SHARDS_DIR, generation)
        try:
            for shard, name in zip(self._shards, _shard_names(generation, len(self._shards))):
                shard.save(os.path.join(directory, name))
            # Index.save made each shard durable; now the folders that name them.
            for path in (folder, os.path.dirname(folder), directory):
                storage.fsync_path(path)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        # The switch. Should it fail before its rename, the next save removes the folder.
        _write_layout(directory, generation, self._manifest)
        _remove_unreferenced(directory, keep={generation, previous})

    def close(self):
        """Stops logging and lets another writer open the directory.

        The index stays searchable; further changes raise.
        """
        with self._lock:
            if self._writer_lock is None:
                return
            for shard in self._shards:
                shard.close()
            self._writer_lock.release()
            self._writer_lock = self._directory = None
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
