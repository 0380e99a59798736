"""The write-ahead log of a snapshot: changes made since it was written.

Each line of wal.jsonl is `<crc32 of body, 8 hex digits> <body>`, the body
one JSON object: {"op": "upsert", "keys": [...], "embeddings": base64 of
little-endian float32 [n, dim], "sources": [...] or null, and "metadata": [one
object or null per key], present only when some item has metadata},
{"op": "delete", "keys": [...]} or {"op": "manifest", "updates": {...}}.
A writable index appends and fsyncs a line before a change is applied and
returned. Loading replays the log. A last line without its newline is a write
cut short by a crash, never acknowledged, and is ignored. A damaged last line
that has its newline was written whole, so it may be an acknowledged change
whose bytes went bad: it is ignored too, so that the index still opens, but
with a warning, and a writer that cuts it off keeps a copy (`cut_to_intact`).
A damaged earlier line is corruption (DamagedLogError): loading stops, and
`jaxretrieval recover-index` (`jaxretrieval.index.recover`) keeps what came
before it.
"""

import base64
import json
import logging
import os
import re
import zlib

import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index.checks import CORE_MANIFEST_KEYS
from jaxretrieval.index.metadata import checked_metadata_list

logger = logging.getLogger(__name__)

LOG_FILE = "wal.jsonl"
RECOVER_COMMAND = "jaxretrieval recover-index --workdir DIR"


class DamagedLogError(ValueError):
    """A log line that cannot be read or replayed, before the log's last line."""

    def __init__(self, message, line):
        super().__init__(message)
        self.line = line


def encode_record(record):
    body = json.dumps(record, ensure_ascii=True, allow_nan=False,
                      separators=(",", ":")).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_line(line):
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


def read_lines(path):
    """(whole lines, the bytes after the last newline) of a log; a missing log is empty."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return [], b""
    *lines, tail = data.split(b"\n")
    return lines, tail


def read_log(path):
    """(records, bytes of intact lines) of a snapshot's log."""
    lines, tail = read_lines(path)
    records, intact_size = [], 0
    for number, line in enumerate(lines, 1):
        record = decode_line(line)
        if record is None:
            if number == len(lines) and not tail:
                logger.error(
                    "%s line %d, the last, is damaged although it was written whole: the "
                    "update it logged, which may have been acknowledged, is lost. The index "
                    "opens without it; opening it for writing moves the line aside. Check "
                    "the disk, and repeat that update if it is missing.", path, number)
                break
            raise DamagedLogError(f"{LOG_FILE} line {number} is damaged", number)
        records.append(record)
        intact_size += len(line) + 1
    # A non-empty tail lacks its newline, so it was cut short too: not counted as intact.
    return records, intact_size


def intact_prefix(path):
    """(records before the first damaged line, number of that line or None, whole lines,
    whether a line cut short follows them), for recovery."""
    lines, tail = read_lines(path)
    records = []
    for number, line in enumerate(lines, 1):
        record = decode_line(line)
        if record is None:
            return records, number, len(lines), bool(tail)
        records.append(record)
    return records, None, len(lines), bool(tail)


def encode_vectors(vectors):
    return base64.b64encode(vectors.astype("<f4").tobytes()).decode("ascii")


def decode_vectors(text, count, dim):
    raw = base64.b64decode(text, validate=True)
    if len(raw) != count * dim * 4:
        raise ValueError(f"{len(raw)} bytes of embeddings for {count} x {dim} floats")
    return np.frombuffer(raw, "<f4").astype(np.float32).reshape(count, dim)


def logged_strings(values):
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("expected a list of strings")
    return values


def replayed(state, manifest, records):
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
                keys = logged_strings(record["keys"])
                vectors = decode_vectors(record["embeddings"], len(keys), state.dim)
                sources = record["sources"]
                if sources is not None:
                    if len(logged_strings(sources)) != len(keys):
                        raise ValueError("not one source per key")
                    # As upsert did: the net changes are applied to this.
                    state = state.recording_sources()
                # Absent from records written before metadata, and when no item had any.
                metadata = checked_metadata_list(record.get("metadata"), len(keys))
                for row, key in enumerate(keys):
                    changes.pop(key, None)
                    changes[key] = (vectors[row], sources[row] if sources else None,
                                    metadata[row] if metadata else None)
            elif op == "delete":
                for key in logged_strings(record["keys"]):
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
        except (KeyError, TypeError, ValueError, IndexError, JaxRetrievalError) as error:
            # Records are the log's lines in order, so record n is line n.
            raise DamagedLogError(f"{LOG_FILE} line {number}: {error}", number) from None
    if changes:
        state = state.with_changes(changes)
    return state, manifest


class Log:
    """A snapshot's log, open for appending durably.

    A failed append cuts the file back to its last whole line; should even that
    fail, the log closes itself and sets `broken`, and must not be written again.
    """

    def __init__(self, path):
        self._file = open(path, "ab", buffering=0)
        self._size = os.fstat(self._file.fileno()).st_size
        self.broken = False

    def append(self, record):
        """Writes `record` as one line and fsyncs it before returning."""
        line = encode_record(record)
        try:
            written = 0
            while written < len(line):
                written += self._file.write(line[written:])
            os.fsync(self._file.fileno())
        except BaseException:
            # A partial line would make every later record unreadable:
            # cut it off, or stop logging if even that fails.
            try:
                os.ftruncate(self._file.fileno(), self._size)
                os.fsync(self._file.fileno())
            except OSError:
                self.close()
                self.broken = True
            raise
        self._size += len(line)

    def close(self):
        self._file.close()


def cut_to_intact(path, intact_size, aside_directory):
    """Drops a damaged last line, so the next record is not appended to it.

    A line cut short by a crash was never acknowledged and just goes; a whole line gone bad
    is first copied into `aside_directory`, so that no acknowledged bytes are thrown away.
    """
    if os.path.getsize(path) <= intact_size:
        return
    with open(path, "r+b") as file:
        file.seek(intact_size)
        cut = file.read()
        if cut.endswith(b"\n"):
            copy = keep_aside(path, cut, aside_directory)
            logger.error("moved the damaged last line of %s to %s", path, copy)
        file.truncate(intact_size)
        os.fsync(file.fileno())


def keep_aside(path, data, aside_directory):
    """Writes `data`, from the log at `path`, durably to a new file in `aside_directory`."""
    os.makedirs(aside_directory, exist_ok=True)
    number = len(os.listdir(aside_directory)) + 1
    while True:
        copy = os.path.join(aside_directory, f"{number:04d}-{LOG_FILE}")
        try:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            number += 1
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    fd = os.open(aside_directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return copy
