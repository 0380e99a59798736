"""The after-training pipeline (jaxretrieval.pipeline) on the session's trained workdir."""

import json
import math
import os
import shutil

import pytest

from jaxretrieval.export import load_embedding_export
from jaxretrieval.pipeline import PIXEL_PREFIX, metrics_table, rebuild_index
from jaxretrieval.workdir import Workdir

METRICS = ("recall@1", "recall@5", "recall@10", "map@r", "r_precision")


def test_evaluate_and_index_writes_the_metrics_it_returns(trained_workdir):
    workdir, metrics = trained_workdir
    with open(Workdir(workdir).metrics_path) as f:
        assert json.load(f) == metrics
    for name in METRICS:
        assert 0.0 <= metrics[name] <= 1.0 and 0.0 <= metrics[PIXEL_PREFIX + name] <= 1.0
    assert metrics["dataset"] == "digits" and metrics["split"] == "held_out_images"
    assert metrics["checkpoint_step"] == 8 and metrics["num_queries"] > 0
    thresholds = metrics["match_thresholds"]
    assert -1.0 <= thresholds["best_f1"] <= 1.0
    # The thresholds travel with the export, so an index rebuilt from it keeps them.
    export = load_embedding_export(Workdir(workdir).embeddings)
    assert export.metadata["match_thresholds"] == thresholds


@pytest.fixture
def copied_workdir(trained_workdir, tmp_path):
    """The trained workdir's config and export, without its index (the session's stays)."""
    source = Workdir(trained_workdir[0])
    copy = Workdir(tmp_path / "wd")
    os.makedirs(copy.path)
    shutil.copy(source.config_path, copy.config_path)
    shutil.copy(source.metrics_path, copy.metrics_path)
    shutil.copytree(source.embeddings, copy.embeddings)
    return copy


def test_rebuild_index_builds_the_index_from_the_export_alone(copied_workdir):
    export = load_embedding_export(copied_workdir.embeddings)
    index = rebuild_index(copied_workdir.path)
    assert os.listdir(copied_workdir.index)
    assert index.count == len(export.keys) == 1797
    assert index.manifest["checkpoint_step"] == 8
    assert index.manifest["match_thresholds"] == export.metadata["match_thresholds"]
    keys, scores = index.search(export.embeddings[:3], k=1)
    assert [row[0] for row in keys] == list(export.keys[:3])
    assert all(row[0] > 0.99 for row in scores)


def test_metrics_table_sets_the_model_beside_the_pixels():
    table = metrics_table({"recall@1": 0.98765, "pixels/recall@1": 0.5, "map@r": 0.25,
                           "dataset": "digits"})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "model", "pixels"]
    assert lines[1].split() == ["recall@1", "0.9877", "0.5000"]
    name, model, pixels = lines[2].split()
    assert (name, model) == ("map@r", "0.2500") and math.isnan(float(pixels))
    assert len(lines) == 3  # only the metrics present, and no other keys
