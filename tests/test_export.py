"""The chunked embedding export, in one process (tests/test_multihost.py runs it on two)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxretrieval.data.sources import load_dataset
from jaxretrieval.embed import Embedder
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.pipeline import embed_corpus, rebuild_index
from jaxretrieval.export import (load_embedding_export, partial_directory,
                                 write_embedding_export)
from jaxretrieval.workdir import Workdir


@pytest.fixture(scope="module")
def embedder_and_dataset(trained_workdir):
    workdir, _ = trained_workdir
    embedder = Embedder.from_workdir(workdir)
    return embedder, load_dataset(embedder.config)


def test_chunks_are_a_multiple_of_the_device_count_and_read_back_in_order(
        tmp_path, embedder_and_dataset, trained_workdir):
    embedder, dataset = embedder_and_dataset
    meta = write_embedding_export(str(tmp_path / "e"), embedder, dataset, chunk_size=250,
                                  metadata={"dataset": "digits"})
    assert (meta["chunk_size"], meta["num_chunks"], meta["count"]) == (252, 8, 1797)  # 4 devices
    assert sorted(os.listdir(tmp_path / "e" / "chunks")) == [f"{c:06d}" for c in range(8)]
    export = load_embedding_export(str(tmp_path / "e"))
    reference = load_embedding_export(Workdir(trained_workdir[0]).embeddings)
    np.testing.assert_allclose(export.embeddings, reference.embeddings, atol=1e-5)
    assert export.labels.tolist() == dataset.labels.tolist()
    assert export.metadata["dataset"] == "digits" and export.metadata["complete"]
    assert not os.path.exists(partial_directory(str(tmp_path / "e")))


def test_a_partial_export_of_another_model_is_discarded_not_resumed(
        tmp_path, embedder_and_dataset):
    embedder, dataset = embedder_and_dataset
    out = str(tmp_path / "e")
    partial = partial_directory(out)
    os.makedirs(os.path.join(partial, "chunks", "000000"))
    with open(os.path.join(partial, "export.json"), "w") as f:
        json.dump({"format": 2, "checkpoint_step": 999, "complete": False}, f)
    write_embedding_export(out, embedder, dataset, chunk_size=1000)
    export = load_embedding_export(out)
    # Chunk 0 was computed afresh, not taken from the other model's empty folder.
    np.testing.assert_allclose(export.embeddings[:4], embedder.embed_uint8(
        dataset.images(np.arange(4))), atol=1e-5)


def test_reading_a_missing_or_unfinished_export_says_how_to_write_it(tmp_path):
    with pytest.raises(JaxRetrievalError, match="jaxretrieval embed --workdir DIR"):
        load_embedding_export(str(tmp_path / "none"))
    os.makedirs(tmp_path / "half")
    with open(tmp_path / "half" / "export.json", "w") as f:
        json.dump({"format": 2, "complete": False}, f)
    with pytest.raises(JaxRetrievalError, match="no finished embedding export"):
        load_embedding_export(str(tmp_path / "half"))


def test_a_folder_corpus_is_embedded_and_indexed_with_the_models_thresholds(
        tmp_path, trained_workdir):
    workdir, metrics = trained_workdir
    run = tmp_path / "run"
    import shutil
    shutil.copytree(workdir, run)
    gallery = tmp_path / "gallery"
    os.makedirs(gallery)
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(
            gallery / f"item{i}.png")
    meta = embed_corpus(str(run), dataset=f"folder:{gallery}", chunk_size=4)
    assert (meta["count"], meta["num_chunks"]) == (7, 2)
    index = rebuild_index(str(run))
    assert sorted(index.keys) == [f"item{i}.png" for i in range(7)]
    assert index.manifest["match_thresholds"] == metrics["match_thresholds"]
