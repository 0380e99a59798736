"""An index directory on disk: snapshots, CURRENT, LOCK, fsync, and the rules both layouts share.

On-disk layout of a flat index directory (format 2):

    CURRENT                   the name of the snapshot in use, e.g. "00000003"
    LOCK                      held (flock) by the one writer: save, snapshot,
                              or an index opened with `writable=True`
    snapshots/<version>/      one complete snapshot:
        manifest.json         format version, model identity, ScaNN settings, ...
        keys.json             JSON list of row keys
        sources.json          JSON list of row sources (absent when there are none)
        metadata.json         JSON list of row metadata, an object or null per row
                              (absent when no row has any: indexes written before
                              metadata existed load as items without it; versions
                              before it ignore the file)
        embeddings.npy        [count, dim] in the settings' embedding_dtype (float32,
                              float16 or int8: jaxretrieval.index.precision), so
                              the index can be rebuilt
        embedding_scales.npy  float32 [count], each int8 row's scale (int8 only)
        scann/                ScaNN's serialized searcher (absent when count is 0)
        wal.jsonl             write-ahead log of changes made since the snapshot
                              (format: jaxretrieval.index.wal)
    damaged-logs/             copies of damaged log lines, kept aside, never deleted:
                              a damaged last line cut off by a writer, and the logs
                              that `jaxretrieval.index.recover` recovered from

Saving writes a new snapshot folder (under a temporary name, renamed once
complete and fsynced) and then replaces CURRENT atomically; a folder cannot
replace a non-empty folder, hence the pointer file. Snapshots other than the
new one and the one CURRENT named before are deleted after the switch, so a
reader that has just read CURRENT still finds its files.

Format 1 directories (the snapshot files directly in the directory, no
CURRENT) still load; saving into one, or opening it writable, converts it.

A directory holding shards.json is a sharded index (jaxretrieval.index.sharded
describes its layout); it shares LOCK, the save pre-check, the load retry and
the rebuild advice with the flat layout, all defined here.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np

from jaxretrieval.errors import JaxRetrievalError, WriterBusyError
from jaxretrieval.index.checks import CORE_MANIFEST_KEYS
from jaxretrieval.index.metadata import BadMetadataError, checked_metadata_list
from jaxretrieval.index.precision import (EMBEDDING_DTYPES, SCALES_FILE, decode, dtype_of,
                                          encode)
from jaxretrieval.index.scann_adapter import SCANN_ASSETS_FILE, load_searcher
from jaxretrieval.index.state import State
from jaxretrieval.index.wal import (LOG_FILE, RECOVER_COMMAND, DamagedLogError, read_log,
                                    replayed)
from jaxretrieval.fileio import recover_interrupted_swap, write_file_atomically

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2

# A reader can lose the race with two snapshots in a row deleting the one it
# was reading; it then starts again from what the directory names now.
LOAD_ATTEMPTS = 3

CURRENT_FILE = "CURRENT"
LOCK_FILE = "LOCK"
SNAPSHOTS_DIR = "snapshots"
MANIFEST_FILE = "manifest.json"
KEYS_FILE = "keys.json"
SOURCES_FILE = "sources.json"
METADATA_FILE = "metadata.json"
EMBEDDINGS_FILE = "embeddings.npy"
SCANN_DIR = "scann"
# What a format 1 directory holds, all removed once it has been converted.
FLAT_LAYOUT_ENTRIES = (MANIFEST_FILE, KEYS_FILE, SOURCES_FILE, METADATA_FILE, EMBEDDINGS_FILE,
                       SCANN_DIR)
TEMPORARY_SNAPSHOT_PREFIX = ".tmp-"
VERSION_PATTERN = re.compile(r"[0-9]{1,20}")
# The sharded layout: its manifest (a directory holding it is sharded) and the
# folder of its shard generations.
SHARDS_FILE = "shards.json"
SHARDS_DIR = "shards"
# Where damaged log lines are kept aside, in either layout's top directory.
DAMAGED_LOGS_DIR = "damaged-logs"


def rebuild_hint(num_shards=1, *, verb="rebuild it", stale_model=False):
    """How a user (re)builds an index of `num_shards` shards ("S" when unknown).

    A damaged sharded index is rebuilt from the embedding export alone; a stale model
    (`stale_model`) needs the items embedded again first, which keeps the shard count.
    """
    embed = "python -m train --eval_only --workdir DIR"
    shard = f"jaxretrieval index --workdir DIR --shards {num_shards}"
    if num_shards == 1:
        return f"{verb} with `{embed}` (DIR is the training workdir)"
    if stale_model:
        return (f"{verb} with `{embed}` (DIR is the training workdir), "
                f"then shard it again with `{shard}`")
    return f"{verb} with `{shard}` (DIR is the training workdir)"


class UnreadableIndexError(JaxRetrievalError):
    """A saved index that is missing files, damaged, or of a newer format.

    Its message is `reason` followed by `rebuild_hint(num_shards)`; a sharded index
    re-raises a shard's error `for_shards(S)`, so it advises rebuilding the whole.
    """

    def __init__(self, reason, num_shards=1):
        self.reason = reason
        super().__init__(reason + rebuild_hint(num_shards))

    def for_shards(self, num_shards):
        return UnreadableIndexError(self.reason, num_shards)


def corrupt(directory, problem, num_shards=1):
    return UnreadableIndexError(f"the index at {directory} is corrupt ({problem}): ",
                                num_shards)


def damaged_log(directory, problem, num_shards=1):
    return UnreadableIndexError(
        f"the index at {directory} is corrupt ({problem}): keep every update logged before "
        f"the damage with `{RECOVER_COMMAND}` (DIR is the training workdir; in Python "
        "jaxretrieval.index.recover(INDEX_DIRECTORY)), which moves the damaged log aside "
        "and reports what is lost, or ", num_shards)


def incomplete(directory, missing, num_shards=1):
    return UnreadableIndexError(f"the index at {directory} is incomplete ({missing} is "
                                "missing): ", num_shards)


def too_new(directory, format_version, readable, *, what="index", num_shards=1):
    return UnreadableIndexError(
        f"the {what} at {directory} has format_version {format_version}, but this "
        f"jaxretrieval reads only up to {readable}: upgrade jaxretrieval or ", num_shards)


def check_expected(directory, manifest, expected, num_shards=1):
    """Refuses an index whose manifest differs from `expected` (e.g. another model's)."""
    mismatches = [
        f"{key} is {manifest.get(key)!r} in the index but {value!r} is expected"
        for key, value in (expected or {}).items()
        if manifest.get(key) != value
    ]
    if mismatches:
        raise JaxRetrievalError(
            f"the index at {directory} does not match the current model: "
            f"{'; '.join(mismatches)}. "
            f"{rebuild_hint(num_shards, verb='Rebuild the index', stale_model=True)}")


def read_json(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def write_json(path, value):
    text = json.dumps(value, indent=2, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        # A key or source with a lone surrogate (from before the key rules): \u escapes
        # keep it, and every JSON reader reads them back.
        data = json.dumps(value, indent=2, ensure_ascii=True).encode("ascii")
    with open(path, "wb") as file:
        file.write(data + b"\n")


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root):
    # Files and then their folders, so a crash after the caller's rename
    # cannot leave a snapshot whose names exist but whose bytes don't.
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


class WriterLock:
    """An exclusive flock on DIR/LOCK: one writer per index directory, of either layout.

    The kernel drops it when the process dies, even by SIGKILL.
    """

    def __init__(self, directory):
        self._file = open(os.path.join(directory, LOCK_FILE), "ab")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise WriterBusyError(
                f"the index at {directory} is open for writing elsewhere (an "
                "Index loaded with writable=True, in this or another process); "
                "close that one (index.close()) before writing here", directory) from None

    def release(self):
        self._file.close()  # closing the file releases the flock


def is_sharded(directory):
    return os.path.isfile(os.path.join(directory, SHARDS_FILE))


def holds_index(directory, *, any_layout):
    """Whether `directory` is empty or holds a flat index (or, with `any_layout`, a sharded
    one), counting what a first save killed before its switch leaves behind."""
    entries = set(os.listdir(directory))
    flat = (not entries or CURRENT_FILE in entries or MANIFEST_FILE in entries
            or entries <= {LOCK_FILE, SNAPSHOTS_DIR})
    if not any_layout:
        return flat
    return flat or SHARDS_FILE in entries or entries <= {LOCK_FILE, SNAPSHOTS_DIR, SHARDS_DIR}


def prepare_directory(directory, *, any_layout=False):
    """The save pre-check: creates `directory`, or checks it holds an index that a save
    may replace (a flat one, or with `any_layout` either layout). True if created."""
    # A directory left mid-swap by format 1's save is put back first.
    recover_interrupted_swap(directory)
    if not os.path.lexists(directory):
        os.makedirs(directory)
        return True
    if not os.path.isdir(directory):
        raise JaxRetrievalError(
            f"cannot save the index to {directory}: it exists and is "
            "not a directory; choose another path or remove it")
    if not holds_index(directory, any_layout=any_layout):
        # Refuse to write into, and later clean up, something not ours.
        raise JaxRetrievalError(
            f"cannot save the index to {directory}: it is a non-empty "
            "directory without an index in it; choose another path "
            "or empty it")
    return False


@contextlib.contextmanager
def saving_into(directory, created: bool):
    """Holds `directory`'s writer lock while a save writes there; a directory the save
    itself created is removed again if the save fails."""
    try:
        writer_lock = WriterLock(directory)
        try:
            yield
        finally:
            writer_lock.release()
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def flat_index_directory(directory):
    """`directory` as an absolute path, checked to hold a flat index to load."""
    directory = os.path.abspath(os.fspath(directory))
    # A directory left mid-swap by format 1's save is put back first.
    recover_interrupted_swap(directory)
    if not os.path.isdir(directory):
        raise JaxRetrievalError(f"no index at {directory}: {rebuild_hint(verb='build it')}")
    if is_sharded(directory):
        raise JaxRetrievalError(
            f"the index at {directory} is sharded ({SHARDS_FILE}): open it with "
            "jaxretrieval.index.open_index(DIRECTORY), which opens either layout")
    return directory


def read_with_retry(read, current):
    """read(current()), started again should a writer switch what `current()` names
    (and remove what `read` was reading) meanwhile."""
    for attempt in range(LOAD_ATTEMPTS):
        named = current()
        try:
            return read(named)
        except (JaxRetrievalError, OSError):
            if attempt + 1 == LOAD_ATTEMPTS or current() == named:
                raise


def read_current(directory):
    """The snapshot version CURRENT names, or None for a format 1 or new directory."""
    try:
        with open(os.path.join(directory, CURRENT_FILE), encoding="ascii") as file:
            version = file.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise corrupt(directory, f"unreadable {CURRENT_FILE}: {error}") from None
    # Checked, so a damaged CURRENT cannot point outside snapshots/.
    if not VERSION_PATTERN.fullmatch(version):
        raise corrupt(directory, f"{CURRENT_FILE} holds {version[:40]!r}, not a snapshot "
                                 "version")
    return version


def snapshot_folder(directory, version):
    if version is None:
        return directory
    return os.path.join(directory, SNAPSHOTS_DIR, version)


def snapshot_directory(directory):
    """The folder holding the current files (manifest.json, ...) of the index at `directory`.

    For a format 1 index that is `directory` itself.
    """
    directory = os.path.abspath(os.fspath(directory))
    return snapshot_folder(directory, read_current(directory))


def next_numbered_name(parent, previous):
    """The name of the next numbered folder in `parent`, after `previous` too.

    Above every folder, even unfinished ones, so no name is ever reused (a
    reader following an older name finds its folder or none).
    """
    taken = [int(name) for name in os.listdir(parent) if VERSION_PATTERN.fullmatch(name)]
    if previous is not None:
        taken.append(int(previous))
    return f"{max(taken, default=0) + 1:08d}"


def write_snapshot_files(folder, state, manifest):
    if state.searcher is not None:
        scann_dir = os.path.join(folder, SCANN_DIR)
        os.mkdir(scann_dir)
        # Relative asset paths, so the index still loads once renamed.
        state.searcher.serialize(scann_dir, relative_path=True)
    stored, scales = encode(state.base_vectors, dtype_of(state.settings))
    np.save(os.path.join(folder, EMBEDDINGS_FILE), stored)
    if scales is not None:
        np.save(os.path.join(folder, SCALES_FILE), scales)
    write_json(os.path.join(folder, KEYS_FILE), state.base_keys)
    if state.has_sources:
        write_json(os.path.join(folder, SOURCES_FILE), state.base_sources)
    if state.base_metadata is not None:
        write_json(os.path.join(folder, METADATA_FILE), state.base_metadata)
    write_json(os.path.join(folder, MANIFEST_FILE),
               {**manifest, "format_version": FORMAT_VERSION})
    open(os.path.join(folder, LOG_FILE), "wb").close()


def write_snapshot(directory, state, manifest):
    """Writes `state` (compacted) as a new snapshot and points CURRENT at it.

    The caller holds the writer lock. Returns (version, previous version).
    If this raises, CURRENT and every existing snapshot are unchanged.
    """
    snapshots = os.path.join(directory, SNAPSHOTS_DIR)
    os.makedirs(snapshots, exist_ok=True)
    try:
        previous = read_current(directory)
    except JaxRetrievalError:
        previous = None  # a damaged index is being replaced
    version = next_numbered_name(snapshots, previous)
    folder = tempfile.mkdtemp(dir=snapshots, prefix=TEMPORARY_SNAPSHOT_PREFIX)
    try:
        write_snapshot_files(folder, state, manifest)
        fsync_tree(folder)
        final_folder = os.path.join(snapshots, version)
        os.rename(folder, final_folder)
        folder = final_folder
        fsync_path(snapshots)
        write_file_atomically(os.path.join(directory, CURRENT_FILE), version + "\n")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return version, previous


def remove_leftover(path):
    """Removes a file or folder that nothing references any more."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError as error:
        # The switch has happened; a leftover only wastes space.
        logger.warning("could not remove %s: %s", path, error)


def finish_switch(directory, version, previous):
    """Makes the CURRENT switch durable, then deletes what nothing needs."""
    fsync_path(directory)
    snapshots = os.path.join(directory, SNAPSHOTS_DIR)
    for name in os.listdir(snapshots):
        stale = (VERSION_PATTERN.fullmatch(name) and name not in (version, previous)
                 or name.startswith(TEMPORARY_SNAPSHOT_PREFIX))
        if stale:
            shutil.rmtree(os.path.join(snapshots, name), ignore_errors=True)
    for name in os.listdir(directory):
        if name in FLAT_LAYOUT_ENTRIES or name.startswith(f".{CURRENT_FILE}.tmp-"):
            remove_leftover(os.path.join(directory, name))


def remove_flat_layout(directory):
    """After a switch to another layout: CURRENT (first, so no reader follows it into
    what goes next), the snapshots and any format 1 files."""
    current = os.path.join(directory, CURRENT_FILE)
    if os.path.exists(current):
        remove_leftover(current)
    for name in os.listdir(directory):
        if (name in (SNAPSHOTS_DIR, *FLAT_LAYOUT_ENTRIES)
                or name.startswith(f".{CURRENT_FILE}.tmp-")):
            remove_leftover(os.path.join(directory, name))


def read_snapshot(directory, version):
    """(state, manifest) of one snapshot, or of a format 1 directory (version None)."""
    folder = snapshot_folder(directory, version)
    prefix = "" if version is None else f"{SNAPSHOTS_DIR}/{version}/"

    def require(relative_path):
        path = os.path.join(folder, relative_path)
        if not os.path.isfile(path):
            raise incomplete(directory, prefix + relative_path)
        return path

    manifest_path = require(MANIFEST_FILE)
    keys_path = require(KEYS_FILE)
    embeddings_path = require(EMBEDDINGS_FILE)
    try:
        manifest = read_json(manifest_path)
        keys = read_json(keys_path)
    except (ValueError, UnicodeDecodeError) as error:
        raise corrupt(directory, f"unreadable JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise corrupt(directory, f"{MANIFEST_FILE} is not a JSON object")

    format_version = manifest.get("format_version")
    if (not isinstance(format_version, int) or isinstance(format_version, bool)
            or format_version < 1):
        raise corrupt(directory, f"format_version is {format_version!r}")
    if format_version > FORMAT_VERSION:
        raise too_new(directory, format_version, FORMAT_VERSION)
    missing = sorted(CORE_MANIFEST_KEYS - manifest.keys())
    if missing:
        raise corrupt(directory, f"manifest lacks {', '.join(missing)}")

    count = manifest["count"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise corrupt(directory, f"{KEYS_FILE} is not a list of strings")
    if len(keys) != count:
        raise corrupt(directory, f"manifest count is {count} but there are {len(keys)} keys")
    sources = None
    sources_path = os.path.join(folder, SOURCES_FILE)
    if os.path.isfile(sources_path):
        try:
            sources = read_json(sources_path)
        except (ValueError, UnicodeDecodeError) as error:
            raise corrupt(directory, f"unreadable JSON: {error}") from None
        if (not isinstance(sources, list) or len(sources) != count
                or not all(isinstance(s, str) for s in sources)):
            raise corrupt(directory, f"{SOURCES_FILE} is not a list of {count} strings")
    metadata = None
    metadata_path = os.path.join(folder, METADATA_FILE)
    if os.path.isfile(metadata_path):
        try:
            metadata = read_json(metadata_path)
        except (ValueError, UnicodeDecodeError) as error:
            raise corrupt(directory, f"unreadable JSON: {error}") from None
        if not isinstance(metadata, list) or len(metadata) != count:
            raise corrupt(directory, f"{METADATA_FILE} is not a list of {count} objects "
                                     "or nulls")
        try:  # what upserts would have refused, so that it fails here and not in a search
            metadata = checked_metadata_list(metadata, count)
        except BadMetadataError as error:
            raise corrupt(directory, f"{METADATA_FILE}: {error}") from None

    try:
        embeddings = np.load(embeddings_path, allow_pickle=False)
    except ValueError as error:
        raise corrupt(directory, f"unreadable {EMBEDDINGS_FILE}: {error}") from None
    settings = manifest["scann"]
    if not isinstance(settings, dict) or settings.get("mode") not in ("exact", "tree_ah"):
        raise corrupt(directory, f"unknown ScaNN settings {settings!r}")
    dtype = dtype_of(settings)
    if dtype not in EMBEDDING_DTYPES:
        raise corrupt(directory, f"unknown embedding_dtype {dtype!r} in the ScaNN settings")
    expected_shape = (count, manifest["embedding_dim"])
    if embeddings.dtype != np.dtype(dtype) or embeddings.shape != expected_shape:
        raise corrupt(directory,
                      f"{EMBEDDINGS_FILE} is {embeddings.dtype} {embeddings.shape}, "
                      f"expected {dtype} {expected_shape}")
    scales = None
    if dtype == "int8":
        try:
            scales = np.load(require(SCALES_FILE), allow_pickle=False)
        except ValueError as error:
            raise corrupt(directory, f"unreadable {SCALES_FILE}: {error}") from None
        if scales.dtype != np.float32 or scales.shape != (count,):
            raise corrupt(directory, f"{SCALES_FILE} is {scales.dtype} {scales.shape}, "
                                     f"expected float32 ({count},)")
    embeddings = decode(embeddings, scales)

    searcher = None
    # Every change can be deleted away; an empty snapshot has no searcher.
    if count:
        require(os.path.join(SCANN_DIR, SCANN_ASSETS_FILE))
        try:
            searcher = load_searcher(os.path.join(folder, SCANN_DIR))
        except (OSError, RuntimeError, ValueError) as error:
            raise corrupt(directory, f"ScaNN could not load its assets: {error}") from None
        if searcher.size() != count:
            raise corrupt(directory, f"the ScaNN searcher holds {searcher.size()} items, "
                                     f"expected {count}")
    try:
        state = State.from_rows(embeddings, keys, sources,
                                has_sources=sources is not None,
                                searcher=searcher, settings=settings, metadata=metadata)
    except JaxRetrievalError as error:
        raise corrupt(directory, str(error)) from None
    return state, manifest


def read_index(directory):
    """(state, manifest, version, log) of the flat index at `directory`, its log replayed.

    `log` is (path, bytes of intact lines); version and log are None for format 1.
    """

    def read(version):
        state, manifest = read_snapshot(directory, version)
        if version is None:
            return state, manifest, None, None
        log_path = os.path.join(snapshot_folder(directory, version), LOG_FILE)
        try:
            records, intact_size = read_log(log_path)
            state, manifest = replayed(state, manifest, records)
        except DamagedLogError as error:
            raise damaged_log(directory, f"{SNAPSHOTS_DIR}/{version}/{error}") from None
        except ValueError as error:
            raise corrupt(directory, f"{SNAPSHOTS_DIR}/{version}/{error}") from None
        if state.compaction_due():
            # A long log left a big delta: rebuild now rather than scan
            # it exhaustively in every search.
            state = state.compacted()
        return state, manifest, version, (log_path, intact_size)

    return read_with_retry(read, lambda: read_current(directory))
