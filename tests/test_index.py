"""Tests for jaxretrieval.index.Index, against the real ScaNN."""

import base64
import json
import os
import pathlib
import shutil
import threading
import zlib

import numpy as np
import pytest

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import FORMAT_VERSION, Index, scann_adapter, snapshot_directory, storage
from jaxretrieval.index import state as state_module

DIM = 16


def unit_vectors(count, dim=DIM, seed=0):
    vectors = np.random.default_rng(seed).normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def clustered_unit_vectors(count, dim, num_clusters, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_clusters, dim))
    vectors = centers[rng.integers(num_clusters, size=count)]
    vectors = vectors + 0.5 * rng.normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def make_keys(count):
    return [f"item-{row}" for row in range(count)]


def build(embeddings, **overrides):
    arguments = dict(checkpoint_step=100, model_config_hash="abc")
    arguments.update(overrides)
    return Index.build(embeddings, make_keys(len(embeddings)), **arguments)


def snapshot_of(directory):
    return pathlib.Path(snapshot_directory(directory))


def numpy_top_k(gallery, queries, k):
    scores = queries @ gallery.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


@pytest.fixture(scope="module")
def gallery():
    return unit_vectors(300, seed=1)


@pytest.fixture(scope="module")
def queries():
    return unit_vectors(20, seed=2)


@pytest.fixture(scope="module")
def small_index(gallery):
    sources = [f"photos/{row % 7}.jpg" for row in range(len(gallery))]
    return build(gallery, sources=sources, extra_manifest={"note": "test"})


def test_exact_search_matches_numpy(small_index, gallery, queries):
    rows, scores = small_index.search_rows(queries, 10)
    expected_rows, expected_scores = numpy_top_k(gallery, queries, 10)

    assert rows.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)

    keys, key_scores = small_index.search(queries, 10)
    assert keys[0] == [f"item-{row}" for row in expected_rows[0]]
    assert all(isinstance(score, float) for score in key_scores[0])
    np.testing.assert_allclose(key_scores, expected_scores, atol=1e-5)


def test_manifest_records_identity_and_settings(small_index):
    manifest = small_index.manifest
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["embedding_dim"] == DIM
    assert manifest["count"] == 300
    assert manifest["checkpoint_step"] == 100
    assert manifest["model_config_hash"] == "abc"
    assert manifest["distance"] == "dot_product"
    assert manifest["scann"] == {"mode": "exact"}
    assert manifest["scann_version"]
    assert manifest["note"] == "test"
    assert small_index.count == 300 and small_index.embedding_dim == DIM
    assert small_index.source_of("item-8") == "photos/1.jpg"


def test_single_query_vector(small_index, queries):
    keys, _ = small_index.search(queries[0], 3)
    batch_keys, _ = small_index.search(queries[:1], 3)
    assert keys == batch_keys and len(keys) == 1


def test_k_is_clipped_to_count():
    index = build(unit_vectors(5))
    rows, scores = index.search_rows(unit_vectors(2, seed=3), 50)
    assert rows.shape == scores.shape == (2, 5)
    assert sorted(rows[0].tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(JaxRetrievalError, match="k must be"):
        index.search(unit_vectors(1), 0)


def test_threshold_drops_low_scores(small_index, queries):
    keys, scores = small_index.search(queries, 10)
    threshold = scores[0][4]
    kept_keys, kept_scores = small_index.search(queries, 10, threshold=threshold)
    for query in range(len(queries)):
        expected = [score for score in scores[query] if score >= threshold]
        assert kept_scores[query] == expected
        assert kept_keys[query] == keys[query][:len(expected)]
    assert len(kept_keys[0]) == 5


def test_wrong_query_dimension_names_both(small_index):
    with pytest.raises(JaxRetrievalError, match=f"dimension 8 .*dimension {DIM}"):
        small_index.search(np.zeros((2, 8), np.float32), 3)


@pytest.mark.parametrize("make_arguments, message", [
    (lambda: (unit_vectors(3), ["a", "b", "a"]), "duplicate key 'a'"),
    (lambda: (unit_vectors(3), ["a", "b"]), "3 embeddings but 2 keys"),
    (lambda: (np.zeros((0, DIM), np.float32), []), "empty"),
    (lambda: (unit_vectors(2)[0], ["a"]), "shape"),
    (lambda: (np.full((2, DIM), np.nan, np.float32), ["a", "b"]), "NaN"),
    (lambda: (2 * unit_vectors(2), ["a", "b"]), "L2-normalised"),
])
def test_bad_build_inputs(make_arguments, message):
    embeddings, keys = make_arguments()
    with pytest.raises(JaxRetrievalError, match=message):
        Index.build(embeddings, keys, checkpoint_step=1, model_config_hash="x")


def test_save_load_round_trip_survives_rename(small_index, queries, tmp_path):
    small_index.save(tmp_path / "index")
    os.rename(tmp_path / "index", tmp_path / "moved")
    # A stale absolute path in ScaNN's assets would point here.
    assert not (tmp_path / "index").exists()

    loaded = Index.load(tmp_path / "moved")

    assert loaded.manifest == small_index.manifest
    assert loaded.keys == small_index.keys
    assert loaded.sources == small_index.sources
    for original, reloaded in zip(small_index.search_rows(queries, 10),
                                  loaded.search_rows(queries, 10)):
        np.testing.assert_array_equal(original, reloaded)
    snapshot = snapshot_of(tmp_path / "moved")
    assert json.loads((snapshot / "keys.json").read_text()) == small_index.keys
    embeddings = np.load(snapshot / "embeddings.npy", allow_pickle=False)
    assert embeddings.shape == (300, DIM)
    assert not list((tmp_path / "moved").rglob("*.pkl"))
    assert sorted(os.listdir(tmp_path)) == ["moved"]


def test_save_writes_a_snapshot_named_by_current(small_index, tmp_path):
    small_index.save(tmp_path / "index")
    version = (tmp_path / "index" / "CURRENT").read_text().strip()
    assert sorted(os.listdir(tmp_path / "index")) == ["CURRENT", "LOCK", "snapshots"]
    assert os.listdir(tmp_path / "index" / "snapshots") == [version]
    snapshot = tmp_path / "index" / "snapshots" / version
    assert snapshot_directory(tmp_path / "index") == str(snapshot)
    assert sorted(os.listdir(snapshot)) == [
        "embeddings.npy", "keys.json", "manifest.json", "scann", "sources.json",
        "wal.jsonl"]
    assert (snapshot / "wal.jsonl").read_bytes() == b""
    manifest = json.loads((snapshot / "manifest.json").read_text())
    assert manifest["format_version"] == 2


def test_load_ignores_absolute_scann_asset_paths(small_index, queries, tmp_path):
    small_index.save(tmp_path / "index")
    assets_path = snapshot_of(tmp_path / "index") / "scann" / "scann_assets.pbtxt"
    # What ScaNN writes by default: paths inside a directory that is gone.
    assets_path.write_text(assets_path.read_text().replace(
        'asset_path: "', 'asset_path: "/gone/index/scann/'))
    loaded = Index.load(tmp_path / "index")
    np.testing.assert_array_equal(loaded.search_rows(queries, 5)[0],
                                  small_index.search_rows(queries, 5)[0])


def test_load_never_unpickles(small_index, tmp_path):
    small_index.save(tmp_path / "index")
    # ScaNN's own load_searcher would unpickle this file.
    (snapshot_of(tmp_path / "index") / "scann" / "scann_docids.pkl").write_bytes(b"not a pickle")
    loaded = Index.load(tmp_path / "index")
    assert loaded.count == small_index.count


def test_updated_manifest_is_saved(small_index, tmp_path):
    updated = small_index.with_manifest(match_thresholds={"f1": 0.5})
    assert "match_thresholds" not in small_index.manifest
    updated.save(tmp_path / "index")
    assert Index.load(tmp_path / "index").manifest["match_thresholds"] == {"f1": 0.5}
    with pytest.raises(JaxRetrievalError, match="count"):
        updated.update_manifest(count=3)


def test_manifest_mismatch_names_the_key(small_index, tmp_path):
    small_index.save(tmp_path / "index")
    Index.load(tmp_path / "index", expected={"embedding_dim": DIM, "checkpoint_step": 100})
    with pytest.raises(JaxRetrievalError, match="embedding_dim is 16 .* 64") as error:
        Index.load(tmp_path / "index", expected={"embedding_dim": 64})
    assert "python -m train --eval_only" in str(error.value)
    with pytest.raises(JaxRetrievalError, match="model_config_hash is 'abc' .* 'zzz'"):
        Index.load(tmp_path / "index", expected={"model_config_hash": "zzz"})


def test_load_missing_or_newer_index(small_index, tmp_path):
    with pytest.raises(JaxRetrievalError, match="no index at .*--eval_only"):
        Index.load(tmp_path / "nothing")
    small_index.save(tmp_path / "index")
    snapshot = snapshot_of(tmp_path / "index")
    manifest_path = snapshot / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(JaxRetrievalError, match="format_version"):
        Index.load(tmp_path / "index")
    (snapshot / "keys.json").unlink()
    with pytest.raises(JaxRetrievalError, match="keys.json is missing"):
        Index.load(tmp_path / "index")


def test_save_replaces_existing_index(small_index, tmp_path):
    small_index.save(tmp_path / "index")
    replacement = build(unit_vectors(7, seed=5), model_config_hash="new")
    replacement.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    assert loaded.count == 7 and loaded.manifest["model_config_hash"] == "new"
    assert loaded.sources is None
    assert sorted(os.listdir(tmp_path)) == ["index"]
    # The previous snapshot stays for readers that had just read CURRENT;
    # older ones go.
    assert sorted(os.listdir(tmp_path / "index" / "snapshots")) == ["00000001", "00000002"]
    small_index.save(tmp_path / "index")
    assert sorted(os.listdir(tmp_path / "index" / "snapshots")) == ["00000002", "00000003"]
    assert Index.load(tmp_path / "index").count == 300


def test_save_refuses_to_replace_other_directories(small_index, tmp_path):
    (tmp_path / "workdir").mkdir()
    (tmp_path / "workdir" / "checkpoint").write_text("precious")
    with pytest.raises(JaxRetrievalError, match="without an index"):
        small_index.save(tmp_path / "workdir")
    assert (tmp_path / "workdir" / "checkpoint").read_text() == "precious"


def assert_old_index_intact(directory):
    loaded = Index.load(directory)
    assert loaded.count == 300
    assert sorted(os.listdir(os.path.dirname(directory))) == ["index"]
    assert os.listdir(os.path.join(directory, "snapshots")) == ["00000001"]


def test_failed_write_leaves_old_index(small_index, tmp_path, monkeypatch):
    small_index.save(tmp_path / "index")

    def failing_write(path, value):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_json", failing_write)
    with pytest.raises(OSError, match="disk full"):
        build(unit_vectors(7, seed=5)).save(tmp_path / "index")
    assert_old_index_intact(str(tmp_path / "index"))


def test_failed_switch_leaves_old_index(small_index, tmp_path, monkeypatch):
    small_index.save(tmp_path / "index")
    real_replace = os.replace

    def replace_failing_for_current(source, destination):
        if os.path.basename(destination) == "CURRENT":
            raise OSError("replace failed")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_for_current)
    with pytest.raises(OSError, match="replace failed"):
        build(unit_vectors(7, seed=5)).save(tmp_path / "index")
    monkeypatch.undo()
    assert_old_index_intact(str(tmp_path / "index"))


def test_failed_first_save_leaves_nothing(small_index, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "write_json", lambda path, value: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        small_index.save(tmp_path / "index")
    assert os.listdir(tmp_path) == []


def test_a_fine_tree_keeps_a_leaf_per_small_cluster(monkeypatch):
    # 80 clusters of about 50 rows and a leaf per 50 rows: each leaf gets about 50 rows of
    # the k-means sample, and ScaNN's own minimum partition size (50) dissolves the leaves
    # that get fewer, scattering those clusters over other leaves.
    monkeypatch.setattr(scann_adapter, "EXACT_SEARCH_MAX_COUNT", 1000)
    monkeypatch.setattr(scann_adapter, "MIN_LEAVES_TO_SEARCH", 1)
    monkeypatch.setattr(scann_adapter, "LEAVES_TO_SEARCH_FRACTION", 0.0)
    vectors = clustered_unit_vectors(4100, 32, num_clusters=80, seed=7)
    gallery, queries = vectors[:4000], vectors[4000:]
    exact_rows, _ = numpy_top_k(gallery, queries, 10)
    ours = scann_adapter.MIN_PARTITION_SAMPLE
    scanns = scann_adapter.SCANN_DEFAULT_MIN_PARTITION_SIZE
    recall = {}
    for min_sample in (ours, scanns):
        monkeypatch.setattr(scann_adapter, "MIN_PARTITION_SAMPLE", min_sample)
        index = build(gallery)
        settings = index.manifest["scann"]
        assert (settings["num_leaves"], settings["num_leaves_to_search"]) == (80, 1)
        assert settings["min_partition_size"] == min_sample
        rows, _ = index.search_rows(queries, 10)
        recall[min_sample] = np.mean([len(set(found) & set(true)) / 10 for found, true
                                      in zip(rows.tolist(), exact_rows.tolist())])
    assert recall[ours] >= 0.9 and recall[scanns] < 0.8, recall


def test_tree_ah_recall(tmp_path, monkeypatch):
    monkeypatch.setattr(scann_adapter, "EXACT_SEARCH_MAX_COUNT", 1000)
    dim = 32
    vectors = clustered_unit_vectors(2100, dim, num_clusters=40, seed=6)
    gallery, queries = vectors[:2000], vectors[2000:]
    index = build(gallery)

    settings = index.manifest["scann"]
    assert settings["mode"] == "tree_ah"
    assert settings["num_leaves"] == 40  # 2,000 rows, at least 50 a leaf
    assert settings["training_sample_size"] == 2000

    rows, _ = index.search_rows(queries, 10)
    exact_rows, _ = numpy_top_k(gallery, queries, 10)
    recall = np.mean([len(set(found) & set(true)) / 10
                      for found, true in zip(rows.tolist(), exact_rows.tolist())])
    assert recall >= 0.8, recall

    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    np.testing.assert_array_equal(loaded.search_rows(queries, 10)[0], rows)

    # Asking for more than the reorder budget still returns that many.
    many_rows, many_scores = index.search_rows(queries[:2], 500)
    assert many_rows.shape == (2, 500)
    valid = many_rows[0] >= 0
    assert np.all(np.diff(many_scores[0][valid]) <= 1e-6)

    # Tombstones are over-fetched past: still k results, none deleted.
    found_keys, _ = index.search(queries, 10)
    deleted = sorted({keys[0] for keys in found_keys})
    index.delete(deleted)
    found_keys, _ = index.search(queries, 10)
    assert all(len(keys) == 10 and not set(keys) & set(deleted) for keys in found_keys)


# Live changes: upsert, delete, compaction.

def brute_force(live, queries, k):
    """Keys and scores of the best k of `live` (key -> vector) per query."""
    keys = list(live)
    scores = queries @ np.stack([live[key] for key in keys]).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ([[keys[column] for column in row] for row in order.tolist()],
            np.take_along_axis(scores, order, axis=1))


def assert_matches_brute_force(index, live, queries, k=10):
    keys, scores = index.search(queries, k)
    expected_keys, expected_scores = brute_force(live, queries, k)
    assert keys == expected_keys
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    rows, row_scores = index.search_rows(queries, k)
    assert [[index.keys[row] for row in query_rows] for query_rows in rows.tolist()] == keys
    np.testing.assert_allclose(row_scores, expected_scores, atol=1e-5)


def live_items(index, gallery):
    return dict(zip(index.keys, gallery))


@pytest.fixture
def fresh_index(gallery):
    return build(gallery, sources=[f"photos/{row}.jpg" for row in range(len(gallery))])


def test_upserted_vector_is_found_first(fresh_index):
    vector = unit_vectors(1, seed=10)
    fresh_index.upsert(["new"], vector, sources=["new.jpg"])
    keys, scores = fresh_index.search(vector, 3)
    assert keys[0][0] == "new" and scores[0][0] == pytest.approx(1.0, abs=1e-5)
    assert fresh_index.count == 301 and fresh_index.manifest["count"] == 301
    assert fresh_index.keys[-1] == "new" and fresh_index.source_of("new") == "new.jpg"
    assert "new" in fresh_index and "other" not in fresh_index
    keys_set = fresh_index.keys_set
    assert "new" in keys_set and "item-0" in keys_set and len(keys_set) == 301
    assert set(keys_set) == set(fresh_index.keys) and 5 not in keys_set


def test_replacing_a_key_changes_its_vector(fresh_index, gallery):
    vector = unit_vectors(1, seed=11)
    fresh_index.upsert(["item-5"], vector, sources=["moved.jpg"])
    assert fresh_index.count == 300
    keys, scores = fresh_index.search(vector, 1)
    assert keys == [["item-5"]] and scores[0][0] == pytest.approx(1.0, abs=1e-5)
    keys, scores = fresh_index.search(gallery[5], 300)
    # Its old vector now matches nothing perfectly, and item-5 only once.
    assert keys[0].count("item-5") == 1 and scores[0][0] < 0.99
    assert fresh_index.source_of("item-5") == "moved.jpg"


def test_delete_removes_key_from_results_and_count(fresh_index, gallery):
    fresh_index.delete(["item-7", "item-8"])
    assert fresh_index.count == 298 and fresh_index.manifest["count"] == 298
    keys, _ = fresh_index.search(gallery[7:9], 300)
    assert all(len(query_keys) == 298 for query_keys in keys)
    assert not {"item-7", "item-8"} & set(keys[0] + keys[1])
    assert "item-7" not in fresh_index.keys and len(fresh_index.sources) == 298
    with pytest.raises(JaxRetrievalError, match="'item-7'.*not in the index"):
        fresh_index.source_of("item-7")
    with pytest.raises(JaxRetrievalError, match="cannot delete 'item-7'.*nothing was deleted"):
        fresh_index.delete(["item-9", "item-7"])
    assert "item-9" in fresh_index


@pytest.mark.parametrize("call, message", [
    (lambda index: index.upsert(["a"], unit_vectors(1, dim=8), ["a.jpg"]),
     "dimension 8 .* dimension 16"),
    (lambda index: index.upsert(["a"], 2 * unit_vectors(1), ["a.jpg"]), "L2-normalised"),
    (lambda index: index.upsert(["a", "a"], unit_vectors(2), ["a", "b"]), "duplicate key 'a'"),
    (lambda index: index.upsert(["a"], unit_vectors(1), ["a.jpg", "b.jpg"]),
     "1 embeddings but 2 sources"),
    (lambda index: index.upsert("a", unit_vectors(1), ["a.jpg"]), "not one string"),
    (lambda index: index.delete("item-1"), "not one string"),
])
def test_bad_changes_are_refused(fresh_index, call, message):
    with pytest.raises(JaxRetrievalError, match=message):
        call(fresh_index)
    assert fresh_index.count == 300


def test_sources_are_optional(fresh_index, tmp_path):
    fresh_index.upsert(["bare"], unit_vectors(1))
    assert fresh_index.source_of("bare") == "" and fresh_index.sources[-1] == ""

    index = build(unit_vectors(5))
    index.upsert(["a"], unit_vectors(1, seed=3))
    assert index.sources is None and index.source_of("a") is None
    index.save(tmp_path / "index")
    with Index.load(tmp_path / "index", writable=True) as writable:
        writable.upsert(["b"], unit_vectors(1, seed=4), sources=["b.jpg"])
        assert writable.sources == [""] * 6 + ["b.jpg"]
        writable.upsert(["b"], unit_vectors(1, seed=5))
        expected = writable.sources
    # Sources are recorded from then on; replay reaches the same state.
    assert expected == [""] * 7
    assert Index.load(tmp_path / "index").sources == expected


def test_random_changes_match_brute_force(gallery, queries):
    index = build(gallery)
    live = live_items(index, gallery)
    rng = np.random.default_rng(12)
    compactions = 0
    for step in range(200):
        if rng.random() < 0.6 or len(live) < 10:
            count = int(rng.integers(1, 4))
            existing = rng.choice(list(live), size=count, replace=False).tolist()
            keys = [key if rng.random() < 0.5 else f"new-{step}-{i}"
                    for i, key in enumerate(existing)]
            vectors = unit_vectors(count, seed=1000 + step)
            index.upsert(keys, vectors)
            for key, vector in zip(keys, vectors):
                live.pop(key, None)
                live[key] = vector
        else:
            keys = rng.choice(list(live), size=int(rng.integers(1, 3)), replace=False)
            index.delete(keys.tolist())
            for key in keys:
                del live[key]
        compactions += index.pending == 0
        assert index.count == len(live)
        if step % 25 == 0:
            assert_matches_brute_force(index, live, queries)
    assert compactions >= 2  # the mix crossed the compaction threshold
    assert index.keys == list(live)  # replaced keys move to the end, as in live
    assert_matches_brute_force(index, live, queries)
    assert_matches_brute_force(index, live, queries, k=1000)


def test_compaction_keeps_results(fresh_index, queries, monkeypatch):
    monkeypatch.setattr(state_module, "COMPACT_MIN_PENDING", 10**9)
    fresh_index.upsert(["item-3", "extra"], unit_vectors(2, seed=13), ["x", "y"])
    fresh_index.delete(["item-4", "item-250"])
    assert fresh_index.pending == 5
    before = fresh_index.search(queries, 20), fresh_index.search_rows(queries, 20)
    keys, sources, manifest = fresh_index.keys, fresh_index.sources, fresh_index.manifest

    fresh_index.compact()

    assert fresh_index.pending == 0
    after = fresh_index.search(queries, 20), fresh_index.search_rows(queries, 20)
    assert after[0][0] == before[0][0]
    np.testing.assert_allclose(after[0][1], before[0][1], atol=1e-6)
    np.testing.assert_array_equal(after[1][0], before[1][0])
    assert (fresh_index.keys, fresh_index.sources, fresh_index.manifest) == (
        keys, sources, manifest)


def test_deleting_everything_leaves_an_empty_index(tmp_path):
    index = build(unit_vectors(3))
    index.delete(index.keys)
    assert index.count == 0 and index.search(unit_vectors(2), 5) == ([[], []], [[], []])
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index", writable=True)
    assert loaded.count == 0
    loaded.upsert(["back"], unit_vectors(1))
    assert loaded.search(unit_vectors(1), 5)[0] == [["back"]]
    loaded.close()


def test_concurrent_searches_see_whole_states(fresh_index, queries):
    errors = []
    stop = threading.Event()

    def search_repeatedly():
        try:
            while not stop.is_set():
                keys, scores = fresh_index.search(queries, 10)
                for query_keys, query_scores in zip(keys, scores):
                    assert len(query_keys) == 10 == len(set(query_keys))
                    assert query_scores == sorted(query_scores, reverse=True)
        except Exception as error:  # handed to the main thread
            errors.append(error)

    threads = [threading.Thread(target=search_repeatedly) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for step in range(100):
            fresh_index.upsert([f"new-{step % 30}"], unit_vectors(1, seed=step), ["s"])
            fresh_index.delete([f"item-{step}"])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]


# The write-ahead log and snapshots.

@pytest.fixture
def saved_directory(fresh_index, tmp_path):
    fresh_index.save(tmp_path / "index")
    return tmp_path / "index"


def log_path(directory):
    return snapshot_of(directory) / "wal.jsonl"


def test_changes_survive_reload(saved_directory, gallery, queries):
    with Index.load(saved_directory, writable=True) as index:
        assert index.writable
        index.upsert(["item-1", "new"], unit_vectors(2, seed=14), ["a.jpg", "b.jpg"])
        index.delete(["item-2"])
        index.update_manifest(match_thresholds={"best_f1": 0.5})
        expected = index.search(queries, 10), index.keys, index.sources, index.manifest
    assert not index.writable
    assert len(log_path(saved_directory).read_text().splitlines()) == 3

    reloaded = Index.load(saved_directory)

    assert (reloaded.search(queries, 10), reloaded.keys, reloaded.sources,
            reloaded.manifest) == expected
    assert reloaded.manifest["count"] == 300 and "item-2" not in reloaded
    Index.load(saved_directory, expected={"count": 300})


def test_log_line_format(saved_directory):
    with Index.load(saved_directory, writable=True) as index:
        index.upsert(["new"], unit_vectors(1, seed=15), ["n.jpg"])
    checksum, body = log_path(saved_directory).read_text().rstrip("\n").split(" ", 1)
    record = json.loads(body)
    assert int(checksum, 16) == zlib.crc32(body.encode())
    assert record["op"] == "upsert" and record["keys"] == ["new"]
    assert record["sources"] == ["n.jpg"]
    vector = np.frombuffer(base64.b64decode(record["embeddings"]), "<f4")
    np.testing.assert_array_equal(vector, unit_vectors(1, seed=15)[0])


def test_torn_last_log_line_is_ignored(saved_directory):
    with Index.load(saved_directory, writable=True) as index:
        index.delete(["item-1"])
        index.delete(["item-2"])
    log = log_path(saved_directory)
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + lines[1][:20])  # killed in the middle of the write

    loaded = Index.load(saved_directory)
    assert "item-1" not in loaded and "item-2" in loaded

    # A writer cuts the torn line off before appending after it.
    with Index.load(saved_directory, writable=True) as index:
        index.delete(["item-3"])
    loaded = Index.load(saved_directory)
    assert "item-2" in loaded and "item-3" not in loaded and loaded.count == 298


def test_torn_line_with_its_newline_is_ignored_only_at_the_end(saved_directory):
    with Index.load(saved_directory, writable=True) as index:
        index.delete(["item-1"])
        index.delete(["item-2"])
    log = log_path(saved_directory)
    first, second = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(first + second.replace(b"item-2", b"item-3"))
    assert Index.load(saved_directory).count == 299

    log.write_bytes(first.replace(b"item-1", b"item-4") + second)
    with pytest.raises(JaxRetrievalError, match="corrupt.*wal.jsonl line 1 is damaged"):
        Index.load(saved_directory)


def test_snapshot_empties_the_log(saved_directory, queries):
    index = Index.load(saved_directory, writable=True)
    index.upsert(["new"], unit_vectors(1, seed=16), ["n.jpg"])
    index.delete(["item-1"])
    before = index.search(queries, 10), index.keys, index.manifest
    first_snapshot = snapshot_of(saved_directory)

    index.snapshot()

    second_snapshot = snapshot_of(saved_directory)
    assert second_snapshot != first_snapshot
    assert (second_snapshot / "wal.jsonl").read_bytes() == b""
    assert (index.search(queries, 10), index.keys, index.manifest) == before
    assert json.loads((second_snapshot / "manifest.json").read_text())["count"] == 300

    index.delete(["item-2"])  # logged beside the new snapshot
    assert len((second_snapshot / "wal.jsonl").read_text().splitlines()) == 1
    index.snapshot()
    index.save(saved_directory)  # its own directory: the same as snapshot()
    assert len(os.listdir(saved_directory / "snapshots")) == 2
    index.close()
    reloaded = Index.load(saved_directory)
    assert reloaded.keys == index.keys and "item-2" not in reloaded


def test_load_compacts_a_long_log(saved_directory, queries, monkeypatch):
    monkeypatch.setattr(state_module, "COMPACT_MIN_PENDING", 10**9)
    with Index.load(saved_directory, writable=True) as index:
        index.upsert([f"new-{i}" for i in range(100)], unit_vectors(100, seed=17),
                     [f"{i}.jpg" for i in range(100)])
        assert index.pending == 100
        expected = index.search(queries, 10)
    monkeypatch.undo()
    loaded = Index.load(saved_directory)
    assert loaded.pending == 0 and loaded.search(queries, 10)[0] == expected[0]


def test_one_writer_at_a_time(saved_directory, gallery):
    index = Index.load(saved_directory, writable=True)
    with pytest.raises(JaxRetrievalError, match="open for writing elsewhere"):
        Index.load(saved_directory, writable=True)
    with pytest.raises(JaxRetrievalError, match="open for writing elsewhere"):
        build(gallery).save(saved_directory)
    assert Index.load(saved_directory).count == 300  # readers are welcome
    index.close()
    with pytest.raises(JaxRetrievalError, match="closed"):
        index.delete(["item-1"])
    Index.load(saved_directory, writable=True).close()
    index.save(saved_directory)  # closed, it saves like any in-memory index
    with pytest.raises(JaxRetrievalError, match="writable=True"):
        build(gallery).snapshot()


def make_format_1_directory(index, directory):
    """What format 1's save wrote: the snapshot files directly in `directory`."""
    index.save(directory)
    snapshot = snapshot_of(directory)
    os.remove(snapshot / "wal.jsonl")
    for name in os.listdir(snapshot):
        os.rename(snapshot / name, directory / name)
    shutil.rmtree(directory / "snapshots")
    os.remove(directory / "CURRENT")
    os.remove(directory / "LOCK")
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))


def test_format_1_directories_load_and_convert(fresh_index, queries, tmp_path):
    directory = tmp_path / "index"
    make_format_1_directory(fresh_index, directory)
    assert sorted(os.listdir(directory)) == [
        "embeddings.npy", "keys.json", "manifest.json", "scann", "sources.json"]

    loaded = Index.load(directory, expected={"checkpoint_step": 100})
    assert loaded.manifest["format_version"] == 1
    assert loaded.keys == fresh_index.keys and loaded.sources == fresh_index.sources
    assert loaded.search(queries, 10) == fresh_index.search(queries, 10)

    with Index.load(directory, writable=True) as writable:
        writable.delete(["item-1"])
    assert sorted(os.listdir(directory)) == ["CURRENT", "LOCK", "snapshots"]
    converted = Index.load(directory)
    assert converted.manifest["format_version"] == 2 and converted.count == 299
