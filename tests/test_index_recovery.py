"""Damage to the write-ahead log: a damaged last line is reported loudly and kept aside,
damage before it names the recovery command, and recovery keeps every update logged before
the damage, in both layouts, from Python and the command line."""

import json
import logging
import os

import numpy as np
import pytest

import jaxretrieval.index
from jaxretrieval import cli
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import Index, ShardedIndex, open_index, shard_of, snapshot_directory

DIM = 8


def unit_rows(count, seed):
    rows = np.random.default_rng(seed).normal(size=(count, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def recover(directory):
    # Looked up when called, so that this file also runs against code without it.
    return jaxretrieval.index.recover(directory)


def log_of(directory):
    return os.path.join(snapshot_directory(directory), "wal.jsonl")


def flip_a_bit(path, line_number):
    """Flips one bit inside the body of line `line_number` (1-based), newline kept."""
    with open(path, "rb") as file:
        lines = file.read().split(b"\n")
    line = bytearray(lines[line_number - 1])
    line[20] ^= 0x04
    lines[line_number - 1] = bytes(line)
    with open(path, "wb") as file:
        file.write(b"\n".join(lines))


@pytest.fixture
def logged_index(tmp_path):
    """An index of 20 items whose log holds four updates: new-0 .. new-3."""
    directory = tmp_path / "index"
    Index.build(unit_rows(20, 0), [f"item-{row}" for row in range(20)], checkpoint_step=1,
                model_config_hash="abc").save(directory)
    with Index.load(directory, writable=True) as index:
        for number in range(4):
            index.upsert([f"new-{number}"], unit_rows(1, 10 + number))
    return directory


def test_a_damaged_last_whole_line_is_reported_and_kept_aside(logged_index, caplog):
    log = log_of(logged_index)
    original = open(log, "rb").read()
    flip_a_bit(log, 4)
    damaged = open(log, "rb").read()
    with caplog.at_level(logging.WARNING):
        index = Index.load(logged_index)
    assert "new-2" in index and "new-3" not in index
    message = " ".join(record.getMessage() for record in caplog.records
                       if record.levelno >= logging.WARNING)
    assert log in message and "line 4" in message and "acknowledged" in message
    # A writer cuts the line off, but only after copying it aside.
    Index.load(logged_index, writable=True).close()
    assert open(log, "rb").read() == original[:original.rindex(b"\n", 0, -1) + 1]
    aside = logged_index / "damaged-logs"
    copies = [open(aside / name, "rb").read() for name in os.listdir(aside)]
    assert copies == [damaged[damaged.rindex(b"\n", 0, -1) + 1:]]


def test_damage_before_the_last_line_names_the_recovery_and_recovery_keeps_the_rest(
        logged_index):
    log = log_of(logged_index)
    flip_a_bit(log, 2)
    damaged = open(log, "rb").read()
    with pytest.raises(JaxRetrievalError, match="line 2 is damaged.*jaxretrieval "
                       "recover-index --workdir DIR.*jaxretrieval.index.recover"):
        Index.load(logged_index)

    report = recover(logged_index)

    assert report["recovered"] and report["lost_records"] == 3
    (entry,) = report["logs"]
    assert entry["damaged_line"] == 2 and entry["kept_records"] == 1
    assert entry["lost_lines"] == [2, 3, 4]
    assert open(entry["kept_aside"], "rb").read() == damaged  # the whole log, kept
    assert os.path.dirname(entry["kept_aside"]) == str(logged_index / "damaged-logs")
    index = Index.load(logged_index)
    assert index.count == 21 and "new-0" in index and "new-1" not in index
    assert open(log_of(logged_index), "rb").read() == b""  # a new snapshot, its log empty
    with Index.load(logged_index, writable=True) as writable:  # and it takes updates
        writable.delete(["new-0"])
    assert Index.load(logged_index).count == 20
    assert recover(logged_index)["recovered"] is False  # nothing left to recover
    assert len(os.listdir(logged_index / "damaged-logs")) == 1


def test_a_record_that_does_not_replay_counts_as_damage(logged_index):
    log = log_of(logged_index)
    with Index.load(logged_index, writable=True) as index:
        index.delete(["new-3"])
    lines = open(log, "rb").read().split(b"\n")
    # Swap the delete before the upsert it deletes: each line is whole, the order is not.
    lines[3], lines[4] = lines[4], lines[3]
    with open(log, "wb") as file:
        file.write(b"\n".join(lines))
    with pytest.raises(JaxRetrievalError, match="recover-index"):
        Index.load(logged_index)
    report = recover(logged_index)
    assert report["logs"][0]["lost_lines"] == [4, 5] and report["lost_records"] == 2
    assert Index.load(logged_index).count == 23


def test_recovery_of_a_sharded_index_recovers_each_damaged_shard(tmp_path):
    directory = tmp_path / "sharded"
    ShardedIndex.build(unit_rows(20, 0), [f"item-{row}" for row in range(20)],
                       checkpoint_step=1, model_config_hash="abc",
                       num_shards=2).save(directory)
    keys = [f"new-{number}" for number in range(12)]
    with open_index(directory, writable=True) as index:
        for number, key in enumerate(keys):
            index.upsert([key], unit_rows(1, 10 + number))
        shard_logs = [log_of(shard_path) for shard_path in
                      jaxretrieval.index.sharded.shard_directories(str(directory))]
    in_shard_1 = [key for key in keys if shard_of(key, 2) == 1]
    assert len(in_shard_1) >= 2
    flip_a_bit(shard_logs[1], 1)
    with pytest.raises(JaxRetrievalError, match="recover-index"):
        open_index(directory)

    report = recover(directory)

    (entry,) = report["logs"]
    assert entry["log"].startswith("shards/") and entry["lost_lines"] == list(
        range(1, len(in_shard_1) + 1))
    recovered = open_index(directory)
    assert recovered.count == 20 + len(keys) - len(in_shard_1)
    assert all((key in recovered) == (key not in in_shard_1) for key in keys)


def test_the_command_line_recovers_a_workdirs_index(logged_index, tmp_path, capsys):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    os.rename(logged_index, workdir / "index")
    flip_a_bit(log_of(workdir / "index"), 3)
    assert cli.main(["recover-index", "--workdir", str(workdir)]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["logs"][0]["lost_lines"] == [3, 4] and "lost lines [3, 4]" in err
    assert Index.load(workdir / "index").count == 22


def test_a_shards_damaged_last_line_is_kept_at_the_top(tmp_path):
    directory = tmp_path / "sharded"
    ShardedIndex.build(unit_rows(20, 0), [f"item-{row}" for row in range(20)],
                       checkpoint_step=1, model_config_hash="abc",
                       num_shards=2).save(directory)
    with open_index(directory, writable=True) as index:
        index.upsert(["new-0"], unit_rows(1, 10))
    shard = jaxretrieval.index.sharded.shard_directories(str(directory))[shard_of("new-0", 2)]
    flip_a_bit(log_of(shard), 1)
    open_index(directory, writable=True).close()
    assert "new-0" not in open_index(directory)
    assert len(os.listdir(directory / "damaged-logs")) == 1
    assert not os.path.exists(os.path.join(shard, "damaged-logs"))
