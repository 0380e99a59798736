"""The write-ahead log of a snapshot: changes made since it was written.

Each line of wal.jsonl is `<crc32 of body, 8 hex digits> <body>`, the body
one JSON object: {"op": "upsert", "keys": [...], "embeddings": base64 of
little-endian float32 [n, dim], "sources": [...] or null},
{"op": "delete", "keys": [...]} or {"op": "manifest", "updates": {...}}.
A writable index appends and fsyncs a line before a change is applied and
returned. Loading replays the log; a damaged last line is a write cut short
by a crash, never acknowledged, and is ignored; a damaged earlier line is
corruption.
"""

import base64
import json
import os
import re
import zlib

import numpy as np

from jaxretrieval.index.checks import CORE_MANIFEST_KEYS

LOG_FILE = "wal.jsonl"


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


def read_log(path):
    """(records, bytes of intact lines, file size) of a snapshot's log."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return [], 0, 0
    *lines, tail = data.split(b"\n")
    records, intact_size = [], 0
    for number, line in enumerate(lines, 1):
        record = decode_line(line)
        if record is None:
            if number == len(lines) and not tail:
                break  # the last line, cut short by a crash: never acknowledged
            raise ValueError(f"{LOG_FILE} line {number} is damaged")
        records.append(record)
        intact_size += len(line) + 1
    # A non-empty tail lacks its newline, so it was cut short too.
    return records, intact_size, len(data)


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
                for row, key in enumerate(keys):
                    changes.pop(key, None)
                    changes[key] = (vectors[row], sources[row] if sources else None)
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
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(f"{LOG_FILE} record {number}: {error}") from None
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


def cut_to_intact(path, intact_size):
    """Drops a last line a crash cut short, so the next record is not appended to it."""
    if os.path.getsize(path) > intact_size:
        with open(path, "r+b") as file:
            file.truncate(intact_size)
            os.fsync(file.fileno())
