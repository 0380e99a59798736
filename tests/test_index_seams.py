"""The seams of jaxretrieval.index: the SearchIndex protocol, ScaNN overrides, shared storage."""

import json
import os

import numpy as np
import pytest

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import (Index, SearchIndex, ShardedIndex, UnreadableIndexError,
                                open_index, rebuild_hint, scann_adapter, scann_settings,
                                snapshot_directory, storage)

DIM = 16
IDENTITY = {"checkpoint_step": 3, "model_config_hash": "abc"}


def unit_rows(count, seed, dim=DIM):
    rows = np.random.default_rng(seed).normal(size=(count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def build(kind, count=60, **extra):
    keys = [f"item-{row}" for row in range(count)]
    sources = [f"{key}.png" for key in keys]
    if kind == "flat":
        return Index.build(unit_rows(count, 0), keys, sources=sources, **IDENTITY, **extra)
    return ShardedIndex.build(unit_rows(count, 0), keys, sources=sources, num_shards=3,
                              **IDENTITY, **extra)


# ---------------------------------------------------------------------------- the protocol

def exercise(index: SearchIndex, directory):
    """What the retriever, the pipeline and the service do with an index, through the
    protocol's names only."""
    assert index.count == 60 and index.embedding_dim == DIM and not index.writable
    assert len(index.keys) == 60 and "item-7" in index and "item-7" in index.keys_set
    assert index.source_of("item-7") == "item-7.png"
    assert sorted(index.sources) == sorted(f"item-{row}.png" for row in range(60))
    keys, scores = index.search(unit_rows(2, 0)[:1], 3)
    assert keys[0][0] == "item-0" and scores[0][0] == pytest.approx(1.0, abs=1e-5)
    index.update_manifest(match_thresholds={"best_f1": 0.5})
    index.save(directory)

    with open_index(directory, writable=True, expected={"embedding_dim": DIM}) as live:
        assert isinstance(live, SearchIndex) and live.writable
        live.upsert(["new"], unit_rows(1, 9), sources=["new.png"])
        live.delete(["item-7"])
        assert live.count == 60 and "new" in live and "item-7" not in live
        assert live.search(unit_rows(1, 9), 1)[0] == [["new"]]
        live.compact()
        live.snapshot()
    live.close()
    with pytest.raises(JaxRetrievalError, match="closed"):
        live.delete(["new"])

    reopened = open_index(directory)
    assert type(reopened) is type(index)
    assert reopened.manifest["match_thresholds"] == {"best_f1": 0.5}
    assert reopened.manifest["count"] == 60 and reopened.source_of("new") == "new.png"
    with pytest.raises(JaxRetrievalError, match="cannot delete 'gone'"):
        reopened.delete(["gone"])


@pytest.mark.parametrize("kind", ["flat", "sharded"])
def test_both_index_types_satisfy_the_protocol(kind, tmp_path):
    index = build(kind)
    assert isinstance(index, SearchIndex)
    exercise(index, tmp_path / "index")


# ---------------------------------------------------------------------------- ScaNN overrides

@pytest.fixture
def approximate(monkeypatch):
    # Tree search for small galleries, so the tests stay fast.
    monkeypatch.setattr(scann_adapter, "EXACT_SEARCH_MAX_COUNT", 1000)


def test_scann_settings_apply_and_record_overrides(approximate):
    automatic = scann_settings(2000)
    assert "overrides" not in automatic and automatic["soar_lambda"] == 1.0
    overridden = scann_settings(2000, {"num_leaves": 20, "soar_lambda": None})
    assert overridden["num_leaves"] == 20 and overridden["soar_lambda"] is None
    # What derives from the leaf count follows the overridden one.
    assert overridden["num_leaves_to_search"] == 10
    assert overridden["overrides"] == {"num_leaves": 20, "soar_lambda": None}
    assert {key: value for key, value in overridden.items()
            if key not in ("num_leaves", "num_leaves_to_search", "soar_lambda",
                           "overrides")} == {
        key: value for key, value in automatic.items()
        if key not in ("num_leaves", "num_leaves_to_search", "soar_lambda")}
    assert scann_settings(500, {"num_leaves": 20}) == {
        "mode": "exact", "overrides": {"num_leaves": 20}}
    for bad in ({"mode": "exact"}, {"leaves": 3}, ["num_leaves"]):
        with pytest.raises(JaxRetrievalError, match="scann_overrides"):
            scann_settings(2000, bad)


def test_build_honours_overrides_through_save_load_and_compaction(approximate, tmp_path):
    overrides = {"num_leaves": 16, "reorder_num_neighbors": 60, "dimensions_per_block": 2}
    index = Index.build(unit_rows(2000, 1, dim=32), [str(row) for row in range(2000)],
                        **IDENTITY, scann_overrides=overrides)
    settings = index.manifest["scann"]
    assert settings["mode"] == "tree_ah" and settings["overrides"] == overrides
    assert {key: settings[key] for key in overrides} == overrides
    queries = unit_rows(5, 2, dim=32)
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    assert loaded.manifest["scann"] == settings
    assert loaded.search(queries, 10) == index.search(queries, 10)
    loaded.delete([str(row) for row in range(300)])  # compacts: a new tree for 1,700
    assert loaded.pending == 0
    rebuilt = loaded.manifest["scann"]
    assert rebuilt["training_sample_size"] == 1700
    assert {key: rebuilt[key] for key in overrides} == overrides


def test_sharded_build_passes_overrides_to_every_shard(approximate):
    index = ShardedIndex.build(unit_rows(3000, 3), [str(row) for row in range(3000)],
                               num_shards=2, **IDENTITY, scann_overrides={"num_leaves": 12})
    for shard in index.shards:
        assert shard.manifest["scann"]["num_leaves"] == 12
    assert "scann" not in index.manifest  # per shard, not part of the sharded manifest


# ---------------------------------------------------------------------------- storage

@pytest.mark.parametrize("kind", ["flat", "sharded"])
def test_both_layouts_share_the_save_pre_check(kind, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(JaxRetrievalError, match="exists and is not a directory"):
        build(kind).save(tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(JaxRetrievalError, match="non-empty directory without an index"):
        build(kind).save(tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


@pytest.mark.parametrize("kind", ["flat", "sharded"])
def test_both_layouts_share_the_writer_lock(kind, tmp_path):
    directory = tmp_path / "index"
    build(kind).save(directory)
    lock = storage.WriterLock(str(directory))
    try:
        for call in (lambda: open_index(directory, writable=True),
                     lambda: build(kind).save(directory)):
            with pytest.raises(JaxRetrievalError, match="open for writing elsewhere"):
                call()
    finally:
        lock.release()
    open_index(directory, writable=True).close()


def test_damaged_files_end_with_the_rebuild_hint_for_their_layout(tmp_path):
    build("flat").save(tmp_path / "flat")
    build("sharded").save(tmp_path / "sharded")
    os.remove(os.path.join(snapshot_directory(tmp_path / "flat"), "keys.json"))
    layout = json.load(open(tmp_path / "sharded" / "shards.json"))
    shard = os.path.join(tmp_path / "sharded", layout["shards"][1])
    os.remove(os.path.join(snapshot_directory(shard), "keys.json"))
    for directory, num_shards in ((tmp_path / "flat", 1), (tmp_path / "sharded", 3)):
        with pytest.raises(UnreadableIndexError) as caught:
            open_index(directory)
        message = str(caught.value)
        assert "keys.json is missing" in message and message.endswith(rebuild_hint(num_shards))


def test_rebuild_hint_names_the_command_for_each_layout():
    assert rebuild_hint() == ("rebuild it with `python -m train --eval_only --workdir DIR` "
                              "(DIR is the training workdir)")
    assert "`jaxretrieval index --workdir DIR --shards 4`" in rebuild_hint(4)
    stale = rebuild_hint(4, stale_model=True)
    assert "--eval_only" in stale and stale.endswith("then shard it again with "
                                                     "`jaxretrieval index --workdir DIR "
                                                     "--shards 4`")


def test_read_with_retry_starts_again_only_when_the_name_moved():
    names = iter(["1", "2", "2", "2"])
    current = [next(names)]
    attempts = []

    def read(name):
        attempts.append(name)
        if name == "1":
            current[0] = next(names)  # a writer switched while this read
            raise OSError("removed under the reader")
        return f"read {name}"

    assert storage.read_with_retry(read, lambda: current[0]) == "read 2"
    assert attempts == ["1", "2"]

    def always_failing(name):
        raise OSError("damaged")

    with pytest.raises(OSError, match="damaged"):
        storage.read_with_retry(always_failing, lambda: "2")
