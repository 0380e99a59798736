"""Indexes that store and score their rows in float16 or int8 (`embedding_dtype`)."""

import os

import numpy as np
import pytest

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import Index
from jaxretrieval.index.precision import decode, encode
from jaxretrieval.index.storage import snapshot_directory

DIM = 32
# Recall@10 of each dtype's index against the float32 index's results, on clustered unit
# vectors like a model's: a margin below what these galleries give, exact or with the tree.
MIN_RECALL = {"float16": 0.97, "int8": 0.93}


def clustered(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, DIM))
    rows = centres[rng.integers(0, 20, n)] + 0.4 * rng.normal(size=(n, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery():
    vectors = clustered(3000)
    keys = [f"item{i}" for i in range(len(vectors))]
    queries = clustered(200, seed=1)
    return vectors, keys, queries


def build(gallery, dtype):
    vectors, keys, _ = gallery
    return Index.build(vectors, keys, checkpoint_step=1, model_config_hash="h",
                       embedding_dtype=dtype)


def test_int8_rows_round_trip_within_half_a_step():
    vectors = clustered(100)
    codes, scales = encode(vectors, "int8")
    assert codes.dtype == np.int8 and scales.shape == (100,)
    assert np.all(np.abs(codes).max(axis=1) == 127)  # each row uses the whole range
    error = np.abs(decode(codes, scales) - vectors)
    assert np.all(error <= scales[:, None] / 2 + 1e-7)
    halves, none = encode(vectors, "float16")
    assert halves.dtype == np.float16 and none is None
    assert np.abs(decode(halves, None) - vectors).max() < 1e-3


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_compact_index_round_trips_and_agrees_with_float32(gallery, dtype, tmp_path):
    _, keys, queries = gallery
    reference_keys, reference_scores = build(gallery, "float32").search(queries, 10)
    index = build(gallery, dtype)
    found_keys, found_scores = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10
                      for a, b in zip(found_keys, reference_keys)])
    assert recall >= MIN_RECALL[dtype], recall
    assert np.abs(np.asarray(found_scores) - np.asarray(reference_scores)).max() < 0.05

    index.save(str(tmp_path / "index"))
    folder = snapshot_directory(str(tmp_path / "index"))
    stored = np.load(os.path.join(folder, "embeddings.npy"))
    assert stored.dtype == np.dtype(dtype) and stored.shape == (len(keys), DIM)
    assert os.path.exists(os.path.join(folder, "embedding_scales.npy")) == (dtype == "int8")
    loaded = Index.load(str(tmp_path / "index"), writable=True)
    try:
        assert loaded.manifest["scann"]["embedding_dtype"] == dtype
        again_keys, again_scores = loaded.search(queries, 10)
        # Searched as stored: the same results before and after the reload.
        assert again_keys == found_keys
        np.testing.assert_allclose(again_scores, found_scores, atol=1e-5)
        # Changes are compacted into the same precision.
        new = clustered(1, seed=5)
        loaded.upsert(["new"], new)
        loaded.compact()
        assert loaded.manifest["scann"]["embedding_dtype"] == dtype
        assert loaded.search(new, 1)[0][0] == ["new"]
    finally:
        loaded.close()


def test_float32_index_records_no_dtype_and_bad_dtype_is_refused(gallery):
    # Settings as before the option, so indexes of either version read alike.
    assert "embedding_dtype" not in build(gallery, "float32").manifest["scann"]
    with pytest.raises(JaxRetrievalError, match="embedding_dtype='int4'; use one of"):
        build(gallery, "int4")


def test_tree_search_reorders_in_the_compact_type(gallery, monkeypatch, tmp_path):
    from jaxretrieval.index import scann_adapter

    # Tree search for this small gallery, so the test stays fast.
    monkeypatch.setattr(scann_adapter, "EXACT_SEARCH_MAX_COUNT", 1000)
    _, _, queries = gallery
    reference, _ = build(gallery, "float32").search(queries, 10)
    index = build(gallery, "int8")
    assert index.manifest["scann"]["mode"] == "tree_ah"
    found, _ = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, reference)])
    assert recall >= MIN_RECALL["int8"], recall
    index.save(str(tmp_path / "index"))
    scann_files = os.listdir(os.path.join(snapshot_directory(str(tmp_path / "index")), "scann"))
    assert "int8_dataset.npy" in scann_files and "dataset.npy" not in scann_files


def test_sharded_index_keeps_every_shard_in_the_dtype(gallery, tmp_path):
    from jaxretrieval.index import ShardedIndex, open_index, save_index

    vectors, keys, queries = gallery
    index = ShardedIndex.build(vectors, keys, checkpoint_step=1, model_config_hash="h",
                               num_shards=2, embedding_dtype="int8")
    save_index(index, str(tmp_path / "index"))
    loaded = open_index(str(tmp_path / "index"))
    try:
        assert [shard.manifest["scann"]["embedding_dtype"] for shard in loaded.shards] == [
            "int8", "int8"]
        assert loaded.search(queries, 10)[0] == index.search(queries, 10)[0]
    finally:
        loaded.close()


def test_index_command_rebuilds_a_workdir_index_in_int8(trained_workdir, tmp_path, capsys):
    import shutil

    from jaxretrieval import cli
    from jaxretrieval.export import load_embedding_export
    from jaxretrieval.retriever import Retriever
    from jaxretrieval.workdir import Workdir

    workdir = str(tmp_path / "wd")
    shutil.copytree(trained_workdir[0], workdir)
    assert cli.main(["index", "--workdir", workdir, "--embedding-dtype", "int8"]) == 0
    capsys.readouterr()
    export = load_embedding_export(Workdir(workdir).embeddings)
    retriever = Retriever.load(workdir)
    try:
        assert retriever.index.manifest["scann"]["embedding_dtype"] == "int8"
        _, scores = retriever.search_embeddings(export.embeddings[:20], k=10)
    finally:
        retriever.close()
    # The tests' barely trained model embeds many items almost alike, so int8's rounding
    # may reorder near-ties: the scores of the best ten are what must agree.
    _, reference = Index.build(export.embeddings, export.keys, checkpoint_step=1,
                               model_config_hash="h").search(export.embeddings[:20], 10)
    assert np.abs(np.asarray(scores) - np.asarray(reference)).max() < 0.02


def test_a_rebuild_keeps_the_dtype_of_the_index_there_unless_told(trained_workdir, tmp_path,
                                                                 capsys):
    import shutil

    from jaxretrieval import cli
    from jaxretrieval.index import embedding_dtype_on_disk, open_index
    from jaxretrieval.pipeline import rebuild_index
    from jaxretrieval.workdir import Workdir

    workdir = str(tmp_path / "wd")
    shutil.copytree(trained_workdir[0], workdir)
    index_dir = Workdir(workdir).index

    def stored_dtypes():
        index = open_index(index_dir)
        try:
            shards = getattr(index, "shards", [index])
            return [shard.manifest["scann"].get("embedding_dtype", "float32")
                    for shard in shards]
        finally:
            index.close()

    assert cli.main(["index", "--workdir", workdir, "--embedding_dtype", "int8"]) == 0
    assert cli.main(["index", "--workdir", workdir, "--shards", "2"]) == 0  # no dtype given
    assert stored_dtypes() == ["int8", "int8"]
    rebuild_index(workdir, num_shards=1)  # as re-evaluation and compress rebuild
    assert stored_dtypes() == ["int8"]
    assert embedding_dtype_on_disk(index_dir) == "int8"
    assert cli.main(["index", "--workdir", workdir, "--embedding-dtype", "float16"]) == 0
    assert stored_dtypes() == ["float16"]
    capsys.readouterr()
    shutil.rmtree(index_dir)
    assert embedding_dtype_on_disk(index_dir) == "float32"  # no index: float32
