"""The Python API over a trained workdir, the index it loads, and the command line."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import run_python
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.pipeline import rebuild_index
from jaxretrieval.index import Index, snapshot_directory
from jaxretrieval.retriever import NoThumbnailError, Retriever, UnknownItemError
from jaxretrieval.workdir import Workdir


def test_a_fresh_process_loads_embeds_and_searches(trained_workdir, data_dir):
    workdir, _ = trained_workdir
    code = (
        "import sys, json, numpy as np\n"
        "from sklearn.datasets import load_digits\n"
        "from jaxretrieval import Retriever\n"
        "r = Retriever.load(sys.argv[1])\n"
        "images = np.round(load_digits().images[[5, 700]] * 255 / 16).astype(np.uint8)\n"
        "vectors = r.embed(list(images[..., None]))\n"
        "keys, scores = r.search(list(images[..., None]), k=10)\n"
        "print(json.dumps({'norms': np.linalg.norm(vectors, axis=1).tolist(),\n"
        "                  'shape': list(vectors.shape), 'dtype': str(vectors.dtype),\n"
        "                  'keys': keys, 'scores': scores}))\n")
    result = run_python(code, workdir, devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["shape"] == [2, 16] and out["dtype"] == "float32"
    np.testing.assert_allclose(out["norms"], 1.0, atol=1e-5)
    for row_keys, row_scores in zip(out["keys"], out["scores"]):
        assert len(row_keys) == len(row_scores) == 10
        assert all(isinstance(k, str) for k in row_keys)
        assert row_scores == sorted(row_scores, reverse=True)
    # Every image is in the index, so a gallery image finds itself first.
    assert [k[0] for k in out["keys"]] == ["train/5", "train/700"]
    assert out["scores"][0][0] == pytest.approx(1.0, abs=1e-4)


def test_search_takes_file_paths_thresholds_and_embeddings(trained_workdir, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    workdir, _ = trained_workdir
    retriever = Retriever.load(workdir)
    pixels = np.round(load_digits().images[42] * 255 / 16).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "query.png")  # as stored: the same 8x8 pixels
    keys, scores = retriever.search([str(tmp_path / "query.png")], k=5)
    assert keys[0][0] == "train/42"
    cut = (scores[0][1] + scores[0][2]) / 2
    short_keys, short_scores = retriever.search([str(tmp_path / "query.png")], k=5, threshold=cut)
    assert short_keys[0] == keys[0][:2] and min(short_scores[0]) >= cut
    vector = retriever.embed([str(tmp_path / "query.png")])
    assert retriever.search_embeddings(vector, k=5)[0] == keys


def copy_workdir(workdir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    return copy


def test_an_index_built_by_another_model_is_refused(trained_workdir, tmp_path):
    workdir = copy_workdir(trained_workdir[0], tmp_path)
    manifest_path = os.path.join(snapshot_directory(Workdir(workdir).index), "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["model_config_hash"] = "0123456789abcdef"
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(JaxRetrievalError, match="model_config_hash.*--eval_only"):
        Retriever.load(workdir)


def test_the_index_rebuilds_from_the_export_without_the_model(trained_workdir, tmp_path):
    workdir = copy_workdir(trained_workdir[0], tmp_path)
    wd = Workdir(workdir)
    before = Index.load(wd.index)
    queries = np.asarray(before.search_rows(np.eye(16, dtype=np.float32), 3)[0])
    shutil.rmtree(wd.index)
    shutil.rmtree(wd.checkpoints)
    rebuild_index(workdir)
    after = Index.load(wd.index)
    assert after.manifest["checkpoint_step"] == before.manifest["checkpoint_step"] == 8
    np.testing.assert_array_equal(after.search_rows(np.eye(16, dtype=np.float32), 3)[0], queries)


def test_command_line_eval_only_and_search(trained_workdir, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    workdir = copy_workdir(trained_workdir[0], tmp_path)
    pixels = np.round(load_digits().images[9] * 255 / 16).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "nine.png")
    code = ("import sys\nfrom jaxretrieval.cli import main\n"
            "assert main(['train', '--eval_only', '--workdir', sys.argv[1]]) == 0\n"
            "assert main(['search', '--workdir', sys.argv[1], '--k', '3', sys.argv[2]]) == 0\n"
            "assert main(['train', '--eval_only', '--workdir', sys.argv[1],\n"
            "             '--config.seed=3']) == 1\n")
    result = run_python(code, workdir, tmp_path / "nine.png", devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "map@r" in result.stdout and "pixels" in result.stdout
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["results"][0]["id"] == "train/9" and len(answer["results"]) == 3
    assert "--eval_only evaluates the workdir's own run" in result.stderr


def test_command_line_bad_config_is_one_clear_error(tmp_path):
    code = ("import sys\nfrom jaxretrieval.cli import main\n"
            "sys.exit(main(['train', '--workdir', sys.argv[1], '--config.split=random']))\n")
    result = run_python(code, tmp_path / "wd", devices=1)
    assert result.returncode == 1
    assert "error: bad config: split='random'; use one of" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "wd")


def test_match_uses_the_calibrated_threshold(trained_workdir):
    from sklearn.datasets import load_digits

    workdir, metrics = trained_workdir
    retriever = Retriever.load(workdir)
    thresholds = retriever.index.manifest["match_thresholds"]
    assert thresholds == metrics["match_thresholds"]
    assert thresholds["target_precision"] == 0.99
    assert -1.0 <= thresholds["best_f1"] <= 1.0 and 0.0 < thresholds["f1"] <= 1.0
    digits = load_digits()
    images = list(np.round(digits.images * 255 / 16).astype(np.uint8)[..., None])
    same = retriever.match(images[0], images[0])
    assert same.similarity == pytest.approx(1.0, abs=1e-4) and same.same is True
    assert same.threshold == retriever.match_threshold is not None
    forced = retriever.match(images[0], images[1], threshold=1.01)
    assert forced.same is False and forced.threshold == 1.01
    expected = float(np.dot(*retriever.embed([images[0], images[1]])))
    assert forced.similarity == pytest.approx(expected, abs=1e-6)


def digit_file(tmp_path, index):
    """Digit `index` of the gallery as a PNG file of its stored 8x8 pixels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    path = str(tmp_path / f"digit{index}.png")
    Image.fromarray(np.round(load_digits().images[index] * 255 / 16).astype(np.uint8)).save(path)
    return path


def unit_vector(dim, axis):
    vector = np.zeros(dim, np.float32)
    vector[axis] = 1.0
    return vector


def test_live_updates_are_searchable_refused_whole_and_survive_a_reload(trained_workdir,
                                                                        tmp_path):
    workdir = copy_workdir(trained_workdir[0], tmp_path)
    retriever = Retriever.load(workdir, writable=True)
    assert retriever.writable and retriever.count == 1797 and retriever.embedding_dim == 16
    nine = digit_file(tmp_path, 9)
    retriever.upsert_images(["new/image"], [nine], sources=[nine])
    keys, scores = retriever.search([nine], k=2)
    assert set(keys[0]) == {"train/9", "new/image"} and min(scores[0]) > 0.9999
    vector = unit_vector(16, 0)
    retriever.upsert_embeddings(["new/vector"], vector[None])
    keys, scores = retriever.search_embeddings(vector[None], k=1)
    assert keys == [["new/vector"]] and scores[0][0] == pytest.approx(1.0, abs=1e-5)
    assert retriever.count == 1799

    with pytest.raises(JaxRetrievalError, match="dimension 17 but the index has dimension 16"):
        retriever.upsert_embeddings(["new/wrong"], unit_vector(17, 0)[None])
    assert "new/wrong" not in retriever and retriever.count == 1799

    retriever.delete(["train/3"])
    assert "train/3" not in retriever and retriever.count == 1798
    with pytest.raises(UnknownItemError, match="no item with id 'train/3'"):
        retriever.delete(["train/3"])
    with pytest.raises(UnknownItemError, match="'nope'.*nothing was deleted"):
        retriever.delete(["new/vector", "nope", "train/3"])
    assert "new/vector" in retriever and retriever.count == 1798
    retriever.close()

    reopened = Retriever.load(workdir, thumbnail_roots=[tmp_path])
    assert not reopened.writable and reopened.count == 1798
    assert "new/image" in reopened and "new/vector" in reopened
    assert "train/3" not in reopened and "new/wrong" not in reopened
    assert reopened.search_embeddings(vector[None], k=1)[0] == [["new/vector"]]
    assert np.asarray(reopened.thumbnail("new/image")).shape == (64, 64)  # its file source


def test_thumbnails_show_an_items_source_and_nothing_else(trained_workdir, tmp_path):
    from PIL import Image

    retriever = Retriever.load(trained_workdir[0], thumbnail_roots=[tmp_path])
    thumbnail = retriever.thumbnail("train/5")  # a TFDS source, read from the run's data_dir
    assert thumbnail.mode == "L" and thumbnail.size == (64, 64)  # 8x8, enlarged 8 times
    assert retriever.thumbnail("train/5", side=32).size == (64, 64)  # never below 64
    big = str(tmp_path / "big.png")
    Image.new("RGB", (400, 200), "red").save(big)
    # An index opened read-only takes changes in memory, which is enough to test with.
    retriever.upsert_images(["new/big"], [big], sources=[big])
    assert retriever.thumbnail("new/big").size == (160, 80)
    assert retriever.thumbnail("new/big", side=100).size == (100, 50)
    with pytest.raises(UnknownItemError, match="no item with id 'nope'"):
        retriever.thumbnail("nope")
    retriever.upsert_embeddings(["new/bare"], unit_vector(16, 1)[None])
    with pytest.raises(NoThumbnailError, match="^no thumbnail for this item$"):
        retriever.thumbnail("new/bare")
    os.remove(big)
    with pytest.raises(NoThumbnailError, match="^no thumbnail for this item$"):
        retriever.thumbnail("new/big")
    # Without the extra root, the file lies outside the digits dataset's: the same answer.
    Image.new("RGB", (400, 200), "red").save(big)
    assert retriever.index.manifest["source_roots"] == ["tfds:sklearn_digits"]  # recorded
    assert retriever.source_roots == ("tfds:sklearn_digits", str(tmp_path))
    with pytest.raises(NoThumbnailError, match="^no thumbnail for this item$"):
        Retriever(retriever.embedder, retriever.index).thumbnail("new/big")
