"""Recovering an index whose write-ahead log is damaged: `recover(directory)`.

Loading refuses a log damaged before its last line, as the changes after the damage cannot
be trusted to apply. Recovery keeps the snapshot and every record before the first damaged
line (or the first that does not replay), copies the whole damaged log into the index's
`damaged-logs/` folder (never deleted), and writes the result as a new snapshot with an
empty log, switched in atomically as every save is. A sharded index is recovered shard by
shard; each shard has its own log. The report names every line given up.
"""

import os

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.fileio import recover_interrupted_swap
from jaxretrieval.index import storage, wal
from jaxretrieval.index.flat import Index
from jaxretrieval.index.sharded import shard_directories


def recover(directory):
    """Keeps every logged change before the damage in the index at `directory` (either
    layout) and reports what was lost.

    Returns {"index", "recovered" (False when no log was damaged: nothing is written),
    "lost_records" (whole lines given up, over all logs), "logs": [one entry per damaged log:
    "log", "damaged_line", "kept_records", "lost_lines" (line numbers, a last line cut short
    by a crash included), "kept_aside" (the copy of the damaged log)]}. Holds the index's
    writer lock meanwhile, so no service may have it open for writing.
    """
    directory = os.path.abspath(os.fspath(directory))
    recover_interrupted_swap(directory)
    if not os.path.isdir(directory):
        raise JaxRetrievalError(
            f"no index at {directory}: {storage.rebuild_hint('S', verb='build one')}")
    aside = os.path.join(directory, storage.DAMAGED_LOGS_DIR)
    top_lock = storage.WriterLock(directory)
    try:
        folders = shard_directories(directory) or [directory]
        logs = []
        for folder in folders:
            shard_lock = storage.WriterLock(folder) if folder != directory else None
            try:
                report = _recover_flat(folder, directory, aside)
            finally:
                if shard_lock is not None:
                    shard_lock.release()
            if report is not None:
                logs.append(report)
    finally:
        top_lock.release()
    return {"index": directory, "recovered": bool(logs), "logs": logs,
            "lost_records": sum(len(log["lost_lines"]) - log["cut_short"] for log in logs)}


def _recover_flat(folder, top, aside):
    """Recovers one flat index folder; None when its log is whole."""
    version = storage.read_current(folder)
    if version is None:
        return None  # format 1 has no log
    state, manifest = storage.read_snapshot(folder, version)
    log_path = os.path.join(storage.snapshot_folder(folder, version), wal.LOG_FILE)
    records, damaged_line, whole_lines, cut_short = wal.intact_prefix(log_path)
    try:
        state, manifest = wal.replayed(state, manifest, records)
    except wal.DamagedLogError as error:
        damaged_line = error.line
        records = records[:error.line - 1]
        state, manifest = wal.replayed(state, manifest, records)
    if damaged_line is None:
        return None  # at most a last line cut short, which loading ignores anyway
    with open(log_path, "rb") as file:
        kept_aside = wal.keep_aside(log_path, file.read(), aside)
    version, previous = Index(state, manifest).write_snapshot(folder)
    storage.finish_switch(folder, version, previous)
    lost = list(range(damaged_line, whole_lines + 1))
    if cut_short:
        lost.append(whole_lines + 1)
    return {"log": os.path.relpath(log_path, top), "damaged_line": damaged_line,
            "kept_records": len(records), "lost_lines": lost, "cut_short": cut_short,
            "kept_aside": kept_aside}
