"""Tests for jaxretrieval.index, against the real ScaNN."""

import json
import os

import numpy as np
import pytest

from jaxretrieval import index as index_module
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import Index

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
    assert manifest["format_version"] == index_module.FORMAT_VERSION
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
    assert json.loads((tmp_path / "moved" / "keys.json").read_text()) == small_index.keys
    embeddings = np.load(tmp_path / "moved" / "embeddings.npy", allow_pickle=False)
    assert embeddings.shape == (300, DIM)
    assert not list((tmp_path / "moved").rglob("*.pkl"))
    assert sorted(os.listdir(tmp_path)) == ["moved"]


def test_load_ignores_absolute_scann_asset_paths(small_index, queries, tmp_path):
    small_index.save(tmp_path / "index")
    assets_path = tmp_path / "index" / "scann" / "scann_assets.pbtxt"
    # What ScaNN writes by default: paths inside a directory that is gone.
    assets_path.write_text(assets_path.read_text().replace(
        'asset_path: "', 'asset_path: "/gone/index/scann/'))
    loaded = Index.load(tmp_path / "index")
    np.testing.assert_array_equal(loaded.search_rows(queries, 5)[0],
                                  small_index.search_rows(queries, 5)[0])


def test_load_never_unpickles(small_index, tmp_path):
    small_index.save(tmp_path / "index")
    # ScaNN's own load_searcher would unpickle this file.
    (tmp_path / "index" / "scann" / "scann_docids.pkl").write_bytes(b"not a pickle")
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
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = index_module.FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(JaxRetrievalError, match="format_version"):
        Index.load(tmp_path / "index")
    (tmp_path / "index" / "keys.json").unlink()
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


def test_failed_write_leaves_old_index(small_index, tmp_path, monkeypatch):
    small_index.save(tmp_path / "index")

    def failing_write(path, value):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "_write_json", failing_write)
    with pytest.raises(OSError, match="disk full"):
        build(unit_vectors(7, seed=5)).save(tmp_path / "index")
    assert_old_index_intact(str(tmp_path / "index"))


def test_failed_swap_leaves_old_index(small_index, tmp_path, monkeypatch):
    small_index.save(tmp_path / "index")
    real_rename = os.rename

    def rename_failing_for_new_index(source, destination):
        if ".index.tmp-" in os.fspath(source):
            raise OSError("rename failed")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename_failing_for_new_index)
    with pytest.raises(OSError, match="rename failed"):
        build(unit_vectors(7, seed=5)).save(tmp_path / "index")
    monkeypatch.undo()
    assert_old_index_intact(str(tmp_path / "index"))


def test_tree_ah_recall(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "EXACT_SEARCH_MAX_COUNT", 1000)
    dim = 32
    vectors = clustered_unit_vectors(2100, dim, num_clusters=40, seed=6)
    gallery, queries = vectors[:2000], vectors[2000:]
    index = build(gallery)

    settings = index.manifest["scann"]
    assert settings["mode"] == "tree_ah"
    assert settings["num_leaves"] == 45
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
