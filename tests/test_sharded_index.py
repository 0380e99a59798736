"""The sharded index: routing, search identical to one Index, changes, layouts on disk."""

import json
import os
import shutil
import threading
import zlib

import numpy as np
import pytest

from conftest import run_python
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.pipeline import rebuild_index
from jaxretrieval.index import (EXACT_SEARCH_MAX_COUNT, Index, ShardedIndex, open_index,
                                save_index, shard_of, snapshot_directory, storage)
from jaxretrieval.index import sharded as sharded_module
from jaxretrieval.retriever import Retriever
from jaxretrieval.workdir import Workdir

DIM = 16
COUNT = 300
IDENTITY = {"checkpoint_step": 8, "model_config_hash": "abc"}


def unit_rows(count, seed):
    rows = np.random.default_rng(seed).normal(size=(count, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery():
    return unit_rows(COUNT, 0), [f"item-{row}" for row in range(COUNT)]


@pytest.fixture(scope="module")
def queries():
    return unit_rows(9, 1)


def build_both(gallery, num_shards, **extra):
    vectors, keys = gallery
    arguments = dict(sources=[f"src-{key}" for key in keys], **IDENTITY, **extra)
    return (Index.build(vectors, keys, **arguments),
            ShardedIndex.build(vectors, keys, num_shards=num_shards, **arguments))


def assert_same_results(got, expected):
    """Same keys in the same order; scores equal up to float32 rounding, because the shards'
    deltas are scored in smaller matrix products than one index's delta."""
    assert got[0] == expected[0]
    for got_row, expected_row in zip(got[1], expected[1]):
        np.testing.assert_allclose(got_row, expected_row, rtol=0, atol=1e-6)


def error_of(call):
    with pytest.raises(JaxRetrievalError) as caught:
        call()
    return str(caught.value)


def shard_path(directory, number):
    layout = json.load(open(os.path.join(directory, "shards.json")))
    return os.path.join(directory, layout["shards"][number])


# ---------------------------------------------------------------------------- routing

def test_routing_is_crc32_of_the_utf8_key():
    # Pinned values: the rule must not change between machines or Python versions.
    assert zlib.crc32(b"a") == 0xE8B7BE43 and shard_of("a", 4) == 0xE8B7BE43 % 4 == 3
    assert shard_of("train/42", 7) == zlib.crc32(b"train/42") % 7
    assert shard_of("gesicht/ö.gif", 5) == zlib.crc32("gesicht/ö.gif".encode()) % 5
    assert shard_of("\ud800", 3) in range(3)  # a lone surrogate still routes


def test_every_key_lands_in_its_crc32_shard(gallery):
    _, sharded = build_both(gallery, 4)
    for number, shard in enumerate(sharded.shards):
        assert shard.count > 0
        assert all(zlib.crc32(key.encode()) % 4 == number for key in shard.keys)
    assert sorted(sharded.keys) == sorted(gallery[1]) and sharded.count == COUNT
    assert sharded.manifest["shard_counts"] == [shard.count for shard in sharded.shards]


# ---------------------------------------------------------------------------- search

@pytest.mark.parametrize("num_shards", [2, 3, 7])
def test_exact_search_is_identical_to_one_index(gallery, queries, num_shards):
    flat, sharded = build_both(gallery, num_shards)
    assert COUNT < EXACT_SEARCH_MAX_COUNT
    largest = max(shard.count for shard in sharded.shards)
    for k in (1, 10, largest + 5, 10 * COUNT):  # beyond a shard's count, and everything's
        keys, scores = sharded.search(queries, k)
        assert (keys, scores) == flat.search(queries, k)
        assert len(keys) == len(queries) and len(keys[0]) == min(k, COUNT)
        assert all(type(score) is float for score in scores[0])
    threshold = float(np.median(flat.search(queries, 40)[1]))
    cut = sharded.search(queries, 40, threshold=threshold)
    assert cut == flat.search(queries, 40, threshold=threshold)
    assert 0 < sum(map(len, cut[0])) < 40 * len(queries)
    assert sharded.search(np.zeros((0, DIM), np.float32), 5) == ([], [])
    # One query goes through ScaNN's one-query kernel, which rounds by position in the
    # searcher: the same items, scores equal to float32 rounding.
    one_keys, one_scores = sharded.search(queries[0], 10)
    flat_keys, flat_scores = flat.search(queries[0], 10)
    assert one_keys == flat_keys
    np.testing.assert_allclose(one_scores, flat_scores, atol=1e-6)


def test_bad_searches_fail_as_on_one_index(gallery, queries):
    flat, sharded = build_both(gallery, 3)
    for call in (lambda index: index.search(queries, 0),
                 lambda index: index.search(queries, True),
                 lambda index: index.search(queries[:, :5], 3),
                 lambda index: index.search([[1.0, "x"]], 3),
                 lambda index: index.search(queries, 3, threshold="high")):
        assert error_of(lambda: call(sharded)) == error_of(lambda: call(flat))


def test_equal_scores_are_ordered_by_key(gallery):
    vectors, keys = gallery
    twin_keys = ["twin-d", "twin-b", "twin-a", "twin-c"]
    assert len({shard_of(key, 3) for key in twin_keys}) > 1  # ties across shards
    sharded = ShardedIndex.build(np.concatenate([vectors, np.repeat(vectors[:1], 4, 0)]),
                                 keys + twin_keys, **IDENTITY, num_shards=3)
    found, scores = sharded.search(vectors[:2], 5)
    assert found[0][:5] == ["item-0", "twin-a", "twin-b", "twin-c", "twin-d"]
    assert len(set(scores[0][:5])) == 1


def test_searches_in_threads_give_the_same_results(gallery, queries, monkeypatch):
    flat, sharded = build_both(gallery, 3)
    threads = set()
    search = Index.search

    def noting_thread(index, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return search(index, *args, **kwargs)

    monkeypatch.setattr(Index, "search", noting_thread)
    monkeypatch.setattr(sharded_module, "PARALLEL_SEARCH_MIN_COUNT", 0)
    assert sharded.search(queries, 25) == flat.search(queries, 25)
    assert any(name.startswith("shard-search") for name in threads)


# ---------------------------------------------------------------------------- building

@pytest.mark.parametrize("change", [
    lambda v, k, a: (v[:, :, None], k, a),
    lambda v, k, a: (v, k[:-1], a),
    lambda v, k, a: (v, k[:5] + [k[2]] + k[6:], a),
    lambda v, k, a: (np.concatenate([v[:7], 2 * v[7:8], v[8:]]), k, a),
    lambda v, k, a: (v, k[:3] + [3] + k[4:], a),
    lambda v, k, a: (v[:0], k[:0], a),
    lambda v, k, a: (v, k, {**a, "sources": ["x"]}),
    lambda v, k, a: (v, k, {**a, "checkpoint_step": "eight"}),
    lambda v, k, a: (v, k, {**a, "model_config_hash": 3}),
    lambda v, k, a: (v, k, {**a, "extra_manifest": {"count": 1}}),
    lambda v, k, a: (v, k, {**a, "extra_manifest": {"bad": object()}}),
])
def test_build_refuses_what_index_build_refuses(gallery, change):
    vectors, keys, arguments = change(*gallery, dict(IDENTITY))
    expected = error_of(lambda: Index.build(vectors, keys, **arguments))
    assert error_of(lambda: ShardedIndex.build(vectors, keys, num_shards=3,
                                               **arguments)) == expected


@pytest.mark.parametrize("num_shards", [0, -2, 257, True, 2.0, "3"])
def test_bad_shard_counts_are_refused(gallery, num_shards):
    with pytest.raises(JaxRetrievalError, match="number of shards must be an integer from 1"):
        ShardedIndex.build(*gallery, **IDENTITY, num_shards=num_shards)


def test_the_sharded_manifest_keys_are_reserved(gallery):
    with pytest.raises(JaxRetrievalError, match="extra_manifest may not set num_shards"):
        ShardedIndex.build(*gallery, **IDENTITY, num_shards=2, extra_manifest={"num_shards": 4})
    _, sharded = build_both(gallery, 2)
    with pytest.raises(JaxRetrievalError, match="may not set routing"):
        sharded.update_manifest(routing="hash")
    with pytest.raises(JaxRetrievalError, match="may not set count"):
        sharded.update_manifest(count=1)


def test_shards_left_empty_still_work(gallery, queries, tmp_path):
    vectors, keys = gallery
    flat = Index.build(vectors[:2], keys[:2], sources=["a", "b"], **IDENTITY)
    sharded = ShardedIndex.build(vectors[:2], keys[:2], sources=["a", "b"], **IDENTITY,
                                 num_shards=6)
    assert sum(shard.count == 0 for shard in sharded.shards) >= 4
    assert sharded.search(queries, 5) == flat.search(queries, 5)
    sharded.save(tmp_path / "index")
    loaded = open_index(tmp_path / "index")
    assert loaded.search(queries, 5) == flat.search(queries, 5)
    assert loaded.source_of(keys[1]) == "b"
    assert sorted(zip(loaded.keys, loaded.sources)) == [(keys[0], "a"), (keys[1], "b")]


# ---------------------------------------------------------------------------- reading

def test_saved_index_loads_with_its_manifest_keys_and_sources(gallery, queries, tmp_path):
    _, sharded = build_both(gallery, 3, extra_manifest={"dataset": "digits", "data_dir": "",
                                                        "match_thresholds": {"best_f1": 0.5}})
    sharded.save(tmp_path / "index")
    layout = json.load(open(tmp_path / "index" / "shards.json"))
    assert layout["format_version"] == 1 and layout["num_shards"] == 3
    assert layout["routing"] == "crc32(utf-8 key) % num_shards"
    assert layout["shards"] == [f"shards/{layout['generation']}/shard-{n:05d}-of-00003"
                                for n in range(3)]
    assert {key: layout[key] for key in ("embedding_dim", "checkpoint_step",
                                         "model_config_hash", "dataset", "match_thresholds")} \
        == {"embedding_dim": DIM, "checkpoint_step": 8, "model_config_hash": "abc",
            "dataset": "digits", "match_thresholds": {"best_f1": 0.5}}
    for name in layout["shards"]:  # each shard is an ordinary Index directory
        assert Index.load(tmp_path / "index" / name).manifest["model_config_hash"] == "abc"

    for loaded in (open_index(tmp_path / "index"), ShardedIndex.load(tmp_path / "index")):
        assert isinstance(loaded, ShardedIndex) and not loaded.writable
        assert loaded.manifest == sharded.manifest
        assert loaded.search(queries, 12) == sharded.search(queries, 12)
        assert loaded.keys == sharded.keys and len(loaded.keys_set) == COUNT
        assert loaded.sources == [f"src-{key}" for key in loaded.keys]
        assert "item-7" in loaded and "item-7" in loaded.keys_set and "nope" not in loaded
        assert 7 not in loaded and 7 not in loaded.keys_set
        assert loaded.source_of("item-7") == "src-item-7"
        assert loaded.embedding_dim == DIM and loaded.num_shards == 3
    assert error_of(lambda: loaded.source_of("nope")) == "key 'nope' is not in the index"


def test_sharded_load_of_a_flat_index_says_what_to_do(gallery, tmp_path):
    flat, _ = build_both(gallery, 2)
    flat.save(tmp_path / "index")
    assert isinstance(open_index(tmp_path / "index"), Index)
    with pytest.raises(JaxRetrievalError, match="no sharded index at .*--shards S"):
        ShardedIndex.load(tmp_path / "index")
    with pytest.raises(JaxRetrievalError, match="no index at"):
        open_index(tmp_path / "missing")


def test_flat_load_of_a_sharded_index_says_what_to_do(gallery, tmp_path):
    _, sharded = build_both(gallery, 2)
    sharded.save(tmp_path / "index")
    for writable in (False, True):
        with pytest.raises(JaxRetrievalError, match="is sharded .shards.json.: open it with "
                                                    "jaxretrieval.index.open_index"):
            Index.load(tmp_path / "index", writable=writable)
    assert isinstance(open_index(tmp_path / "index"), ShardedIndex)


def test_an_index_of_another_model_is_refused(gallery, tmp_path):
    _, sharded = build_both(gallery, 3)
    sharded.save(tmp_path / "index")
    with pytest.raises(JaxRetrievalError, match=(
            r"checkpoint_step is 8 in the index but 9 is expected.*--eval_only.*then shard it "
            r"again with `jaxretrieval index --workdir DIR --shards 3`")):
        open_index(tmp_path / "index", expected={"checkpoint_step": 9, "embedding_dim": DIM})
    with pytest.raises(JaxRetrievalError, match="model_config_hash"):
        ShardedIndex.load(tmp_path / "index", expected={"model_config_hash": "other"},
                          writable=True)
    # Refused writable opens let go of the lock.
    open_index(tmp_path / "index", writable=True).close()


def test_a_missing_shard_folder_says_how_to_rebuild(gallery, tmp_path):
    _, sharded = build_both(gallery, 3)
    sharded.save(tmp_path / "index")
    shutil.rmtree(shard_path(tmp_path / "index", 1))
    with pytest.raises(JaxRetrievalError, match=(
            r"is incomplete \(shard folder shards/\d+/shard-00001-of-00003 is missing\): "
            r"rebuild it with `jaxretrieval index --workdir DIR --shards 3`")):
        open_index(tmp_path / "index")


def test_a_damaged_or_disagreeing_shard_says_how_to_rebuild(gallery, tmp_path):
    _, sharded = build_both(gallery, 3)
    directory = tmp_path / "index"
    sharded.save(directory)
    manifest_path = os.path.join(snapshot_directory(shard_path(directory, 2)), "manifest.json")
    manifest = json.load(open(manifest_path))
    json.dump({**manifest, "model_config_hash": "other"}, open(manifest_path, "w"))
    with pytest.raises(JaxRetrievalError, match=(
            r"inconsistent \(shards/\d+/shard-00002-of-00003 has model_config_hash 'other' but "
            r"shards.json says 'abc'\): rebuild it with `jaxretrieval index --workdir DIR "
            r"--shards 3`")):
        open_index(directory)
    os.remove(os.path.join(snapshot_directory(shard_path(directory, 2)), "keys.json"))
    message = error_of(lambda: open_index(directory))
    assert "keys.json is missing" in message and "--shards 3" in message
    assert "--eval_only" not in message  # Index's flat advice is replaced


def test_shards_holding_keys_of_other_shards_are_refused(gallery, tmp_path):
    _, sharded = build_both(gallery, 3)
    directory = tmp_path / "index"
    sharded.save(directory)
    first, second = shard_path(directory, 0), shard_path(directory, 1)
    os.rename(first, first + ".x")
    os.rename(second, first)
    os.rename(first + ".x", second)
    with pytest.raises(JaxRetrievalError, match=(
            r"shard-00000-of-00003 holds key '[^']+', which belongs in shard 1\): rebuild")):
        open_index(directory)


def test_a_corrupt_shards_file_says_how_to_rebuild(gallery, tmp_path):
    _, sharded = build_both(gallery, 3)
    directory = tmp_path / "index"
    sharded.save(directory)
    path = directory / "shards.json"
    layout = json.load(open(path))
    for damaged, problem in ((b"{not json", "unreadable shards.json"),
                             ({**layout, "shards": ["../../elsewhere"] * 3}, "does not list"),
                             ({**layout, "routing": "hash"}, "routes by 'hash'"),
                             ({**layout, "num_shards": 0}, "number of shards")):
        path.write_bytes(damaged if isinstance(damaged, bytes) else json.dumps(damaged).encode())
        message = error_of(lambda: open_index(directory))
        assert "is corrupt" in message and problem in message
        assert "rebuild it with `jaxretrieval index --workdir DIR --shards" in message
    path.write_text(json.dumps({**layout, "format_version": 2}))
    with pytest.raises(JaxRetrievalError, match="format_version 2.*upgrade jaxretrieval"):
        open_index(directory)


# ---------------------------------------------------------------------------- changes

def test_changes_route_and_survive_reopening(gallery, queries, tmp_path):
    flat, sharded = build_both(gallery, 3)
    directory = tmp_path / "index"
    sharded.save(directory)
    new_keys = [f"new-{n}" for n in range(12)] + ["item-4"]
    new_vectors = unit_rows(len(new_keys), 2)
    deleted = ["item-0", "item-1", "item-2", "new-3"]
    flat.upsert(new_keys, new_vectors)
    flat.delete(deleted)

    with open_index(directory, writable=True) as live:
        assert isinstance(live, ShardedIndex) and live.writable
        live.upsert(new_keys, new_vectors, sources=[f"up-{key}" for key in new_keys])
        live.delete(deleted)
        live.update_manifest(match_thresholds={"best_f1": 0.25})
        for key in new_keys:
            holders = [n for n, shard in enumerate(live.shards) if key in shard]
            assert holders == ([] if key in deleted else [shard_of(key, 3)])
        # One Index with the same history: new items are in its delta too.
        results = live.search(queries, 20)
        assert_same_results(results, flat.search(queries, 20))
        assert live.count == COUNT + 12 - 4
    assert not live.writable
    with pytest.raises(JaxRetrievalError, match="closed.*open_index"):
        live.upsert(["late"], new_vectors[:1])
    assert live.search(queries, 20) == results  # still searchable

    reopened = open_index(directory)  # replays every shard's log
    assert reopened.search(queries, 20) == results
    assert reopened.manifest["match_thresholds"] == {"best_f1": 0.25}
    assert reopened.manifest["count"] == COUNT + 8
    assert reopened.source_of("item-4") == "up-item-4"
    assert reopened.source_of("item-5") == "src-item-5"
    assert "item-0" not in reopened.keys_set

    with open_index(directory, writable=True) as again:
        assert again.search(queries, 20) == results
        # Compacting moves new items from numpy's scoring into ScaNN's, on both.
        again.compact()
        flat.compact()
        results = again.search(queries, 20)
        assert_same_results(results, flat.search(queries, 20))
        again.snapshot()
        again.update_manifest(note="after the snapshot")
    for number in range(3):
        log = os.path.join(snapshot_directory(shard_path(directory, number)), "wal.jsonl")
        with open(log) as f:  # only the manifest update since the snapshot
            assert len(f.read().splitlines()) == 1
    final = open_index(directory)
    assert final.search(queries, 20) == results
    assert final.manifest["note"] == "after the snapshot"
    assert json.load(open(directory / "shards.json"))["note"] == "after the snapshot"


def test_deleting_an_unknown_key_deletes_nothing(gallery):
    flat, sharded = build_both(gallery, 3)
    keys = ["item-1", "ghost", "item-2"]
    assert error_of(lambda: sharded.delete(keys)) == error_of(lambda: flat.delete(keys))
    assert sharded.count == COUNT and "item-1" in sharded
    assert error_of(lambda: sharded.upsert(["a"], np.ones((1, 3), np.float32))) == \
        error_of(lambda: flat.upsert(["a"], np.ones((1, 3), np.float32)))


def test_items_added_without_sources_have_source_empty(gallery):
    vectors, keys = gallery
    sharded = ShardedIndex.build(vectors, keys, **IDENTITY, num_shards=3)
    assert sharded.sources is None and sharded.source_of("item-1") is None
    sharded.upsert(["with"], unit_rows(1, 5), sources=["somewhere"])
    assert sharded.source_of("with") == "somewhere" and sharded.source_of("item-1") == ""
    assert dict(zip(sharded.keys, sharded.sources))["with"] == "somewhere"


def test_one_writer_at_a_time(gallery, tmp_path):
    flat, sharded = build_both(gallery, 3)
    directory = tmp_path / "index"
    sharded.save(directory)
    live = open_index(directory, writable=True)
    for call in (lambda: open_index(directory, writable=True),
                 lambda: sharded.save(directory),
                 lambda: save_index(flat, directory)):
        with pytest.raises(JaxRetrievalError, match="open for writing elsewhere"):
            call()
    # A flat writer cannot take a sharded directory either.
    with pytest.raises(JaxRetrievalError, match="is sharded .*open_index"):
        Index.load(directory, writable=True)
    live.close()
    open_index(directory, writable=True).close()


# ---------------------------------------------------------------------------- layouts

def entries(directory):
    return sorted(os.listdir(directory))


def test_switching_layouts_in_place_always_leaves_a_loadable_index(gallery, queries,
                                                                   tmp_path):
    flat, three = build_both(gallery, 3)
    two = ShardedIndex.build(*gallery, **IDENTITY, num_shards=2)
    expected = flat.search(queries, 15)
    directory = tmp_path / "index"
    flat.save(directory)
    generations = []
    for index in (three, two, flat, three, three, flat):
        save_index(index, directory)
        loaded = open_index(directory)
        assert type(loaded) is type(index)
        assert loaded.search(queries, 15) == expected
        if isinstance(index, ShardedIndex):
            assert loaded.num_shards == index.num_shards
            assert entries(directory) == ["LOCK", "shards", "shards.json"]
            generation = json.load(open(directory / "shards.json"))["generation"]
            # The one before stays for readers that had just read shards.json.
            previous = [g for g in generations[-1:] if g]
            assert previous < [generation]
            assert entries(directory / "shards") == previous + [generation]
            generations.append(generation)
        else:
            assert entries(directory) == ["CURRENT", "LOCK", "snapshots"]
            generations.append(None)


def test_a_failed_save_leaves_the_old_layout(gallery, queries, tmp_path, monkeypatch):
    flat, sharded = build_both(gallery, 3)
    directory = tmp_path / "index"
    flat.save(directory)
    expected = flat.search(queries, 10)
    save = Index.save
    saved = []

    def failing_second_shard(index, path):
        saved.append(path)
        if len(saved) == 2:
            raise OSError("disk full")
        save(index, path)

    monkeypatch.setattr(Index, "save", failing_second_shard)
    with pytest.raises(OSError, match="disk full"):
        sharded.save(directory)
    monkeypatch.undo()
    loaded = open_index(directory)
    assert isinstance(loaded, Index) and loaded.search(queries, 10) == expected
    assert entries(directory / "shards") == []

    sharded.save(directory)
    monkeypatch.setattr(storage, "write_snapshot",
                        lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_index(flat, directory)
    loaded = open_index(directory)
    assert isinstance(loaded, ShardedIndex) and loaded.search(queries, 10) == expected


def test_the_manifest_file_decides_after_an_interrupted_clean_up(gallery, queries, tmp_path,
                                                                  monkeypatch):
    flat, sharded = build_both(gallery, 3)
    directory = tmp_path / "index"
    flat.save(directory)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died right after the switch

    monkeypatch.setattr(storage, "remove_flat_layout", killed)
    with pytest.raises(KeyboardInterrupt):
        sharded.save(directory)
    monkeypatch.undo()
    assert {"CURRENT", "shards.json"} <= set(entries(directory))
    loaded = open_index(directory)
    assert isinstance(loaded, ShardedIndex)
    assert loaded.search(queries, 10) == flat.search(queries, 10)
    save_index(flat, directory)  # the next save tidies up
    assert entries(directory) == ["CURRENT", "LOCK", "snapshots"]


def test_saving_refuses_directories_that_are_not_indexes(gallery, tmp_path):
    _, sharded = build_both(gallery, 2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(JaxRetrievalError, match="non-empty directory without an index"):
        sharded.save(tmp_path / "other")
    assert entries(tmp_path / "other") == ["notes.txt"]


# ---------------------------------------------------------------------------- the workdir

def copy_workdir(workdir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    return copy


def digit_images(rows):
    from sklearn.datasets import load_digits

    return list(np.round(load_digits().images[rows] * 255 / 16).astype(np.uint8)[..., None])


def test_retriever_loads_a_sharded_workdir(trained_workdir, tmp_path):
    workdir = copy_workdir(trained_workdir[0], tmp_path)
    wd = Workdir(workdir)
    flat = Index.load(wd.index)
    rebuilt = rebuild_index(workdir, num_shards=3)
    assert isinstance(rebuilt, ShardedIndex)
    retriever = Retriever.load(workdir)
    assert isinstance(retriever.index, ShardedIndex) and retriever.index.num_shards == 3
    assert retriever.index.count == flat.count == 1797
    assert retriever.index.manifest["match_thresholds"] == flat.manifest["match_thresholds"]
    assert retriever.match_threshold is not None
    vectors = retriever.embed(digit_images([5, 300, 700]))
    keys, scores = retriever.search_embeddings(vectors, k=10)
    assert (keys, scores) == flat.search(vectors, 10)
    assert [row[0] for row in keys] == ["train/5", "train/300", "train/700"]
    # Re-evaluating keeps the sharding; asked for one shard, it goes back to one flat index.
    assert isinstance(rebuild_index(workdir), ShardedIndex)
    assert rebuild_index(workdir, num_shards=1).count == 1797
    assert isinstance(open_index(wd.index), Index)


def test_the_service_serves_a_sharded_index(trained_workdir, tmp_path):
    from fastapi.testclient import TestClient

    from jaxretrieval.service.app import ServiceSettings, create_app

    workdir = copy_workdir(trained_workdir[0], tmp_path)
    rebuild_index(workdir, num_shards=2)
    retriever = Retriever.load(workdir, writable=True)
    settings = ServiceSettings(data_dir=retriever.embedder.config.data_dir,
                               allowed_hosts=("testserver",))  # TestClient's Host
    with TestClient(create_app(retriever, settings)) as client:
        vector = retriever.embed(digit_images([7]))[0]
        found = client.post("/search?k=3", json={"embedding": vector.tolist()}).json()
        assert found["results"][0]["id"] == "train/7"
        added = client.post("/items", json={"items": [{"id": "new/1",
                                                       "embedding": vector.tolist()}]})
        assert added.json() == {"upserted": 1, "items": 1798}
        assert "new/1" in retriever.index.shards[shard_of("new/1", 2)]
        thumbnail = client.get("/items/train/7/thumbnail")
        assert thumbnail.status_code == 200 and thumbnail.content[:4] == b"\x89PNG"
        assert client.delete("/items/train/7").json() == {"deleted": "train/7", "items": 1797}
        assert client.delete("/items/train/7").status_code == 404
        assert client.get("/healthz").json()["items"] == 1797
    retriever.index.close()
    reopened = open_index(Workdir(workdir).index)
    assert "new/1" in reopened and "train/7" not in reopened


def test_command_line_index_shards(trained_workdir, tmp_path):
    workdir = copy_workdir(trained_workdir[0], tmp_path)
    code = ("import sys\nfrom jaxretrieval.cli import main\n"
            "assert main(['index', '--workdir', sys.argv[1], '--shards', '4']) == 0\n"
            "assert main(['index', '--workdir', sys.argv[1], '--shards', '0']) == 1\n")
    result = run_python(code, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(result.stdout)
    assert manifest["num_shards"] == 4 and manifest["count"] == 1797
    assert sum(manifest["shard_counts"]) == 1797
    assert "error: the number of shards must be an integer from 1 to 256, got 0" in result.stderr
    index = open_index(Workdir(workdir).index)
    assert isinstance(index, ShardedIndex) and index.num_shards == 4


def test_failed_first_save_leaves_nothing(gallery, tmp_path, monkeypatch):
    _, sharded = build_both(gallery, 2)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sharded_module, "write_json_atomically", fail)  # shards.json
    with pytest.raises(OSError, match="disk full"):
        sharded.save(tmp_path / "index")
    assert os.listdir(tmp_path) == []
