"""A read-only copy of a flat index that follows the log its one writer appends to.

The writer (an Index opened with `writable=True`, in another process or on another machine
that shares the directory) logs every change before acknowledging it. A `LogFollower`
reads the snapshot that CURRENT names, replays the log with the loader's own replay
(`wal.replayed`), and on each `follow()` applies the whole lines appended since. When the
writer switches to a new snapshot (`Index.snapshot`), CURRENT changes and the follower
starts again from that snapshot, which holds every change of the old log.

A position `(version, offset)` says how far a copy has read: the snapshot version and the
bytes of its log applied. The writer's position after an acknowledged change is where a
follower must be to show it (`writer_position`, `caught_up`).
"""

import logging
import os
import threading

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import storage, wal
from jaxretrieval.index.flat import Index

logger = logging.getLogger(__name__)


def log_path(directory, version):
    """The log of snapshot `version` of the flat index at `directory`."""
    return os.path.join(storage.snapshot_folder(directory, version), wal.LOG_FILE)


def writer_position(directory):
    """(version, offset) of the flat index at `directory` as its writer left it: call it
    in the writer, after a change, to get the position that shows the change."""
    version = storage.read_current(directory)
    try:
        size = os.path.getsize(log_path(directory, version))
    except FileNotFoundError:
        size = 0
    return version, size


def caught_up(position, wanted):
    """True when a copy at `position` shows every change up to `wanted` (None: nothing
    wanted). Versions are numbered, so a later snapshot holds an earlier one's log."""
    if wanted is None:
        return True
    (version, offset), (wanted_version, wanted_offset) = position, wanted
    if version == wanted_version:
        return offset >= wanted_offset
    return int(version or 0) > int(wanted_version or 0)


class LogFollower:
    """A searchable, read-only Index at `directory` (flat layout, or one shard's folder)
    that `follow()` brings up to date with the writer's log.

    `index` is replaced, never changed in place, so searches need no lock. The position and
    the index are published together, once the index holds every change up to the position:
    a reader that sees a position never gets an older index.
    """

    def __init__(self, directory):
        self._directory = os.path.abspath(os.fspath(directory))
        self._lock = threading.Lock()
        self._version = self._offset = None
        self._state = self._manifest = None
        self._published = ((None, None), None)
        self._warned_at = None
        with self._lock:
            self._reload()

    @property
    def position(self):
        """(snapshot version, bytes of its log applied) of `index`."""
        return self._published[0]

    @property
    def index(self):
        return self._published[1]

    def follow(self):
        """Applies what the writer logged since the last call; returns the new position.

        A line the writer has not finished is left for the next call.
        """
        with self._lock:
            if storage.read_current(self._directory) != self._version:
                self._reload()
            else:
                self._apply_new_lines()
            return self.position

    def follow_to(self, wanted):
        """Follows until the position reaches `wanted` (a writer's position), at most a few
        reads; raises JaxRetrievalError if the log does not reach it."""
        for _ in range(3):
            if caught_up(self.position, wanted):
                return
            self.follow()
        if not caught_up(self.position, wanted):
            raise JaxRetrievalError(
                f"the index at {self._directory} is at {self.position}, behind its writer's "
                f"{wanted}: is the directory on storage that every node sees?")

    def _reload(self):
        def read(version):
            state, manifest = storage.read_snapshot(self._directory, version)
            return version, state, manifest

        # A writer's snapshot may switch CURRENT, and remove the old one, as it is read.
        version, state, manifest = storage.read_with_retry(
            read, lambda: storage.read_current(self._directory))
        self._version, self._offset = version, 0
        self._state, self._manifest = state, manifest
        self._apply_new_lines(install=True)

    def _apply_new_lines(self, install=False):
        records, consumed = [], 0
        try:
            with open(log_path(self._directory, self._version), "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            data = b""
        lines = data.split(b"\n")[:-1]  # the last part lacks its newline: unfinished
        for number, line in enumerate(lines):
            record = wal.decode_line(line)
            if record is None:
                at = self._offset + consumed
                if number < len(lines) - 1:
                    # Whole lines follow it, so the writer has gone on past the damage:
                    # waiting would never end, and skipping it would lose a change.
                    raise storage.damaged_log(self._directory, f"log line at byte {at}")
                # A damaged last line is cut off by the writer when it opens; until then the
                # follower waits at it rather than skip a change.
                if self._warned_at != (self._version, at):
                    self._warned_at = (self._version, at)
                    logger.warning("%s: a damaged log line at byte %d; waiting for the writer",
                                   self._directory, at)
                break
            records.append(record)
            consumed += len(line) + 1
        if records:
            state, manifest = wal.replayed(self._state, self._manifest, records)
            if state.compaction_due():
                state = state.compacted()
            self._state, self._manifest = state, manifest
            self._offset += consumed
            install = True
        if install:
            self._published = ((self._version, self._offset), Index(self._state, self._manifest))
