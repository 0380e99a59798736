"""What a run reports: metrics.jsonl with times, the evaluations during training,
TensorBoard's event files, loss.png and results.png."""

import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from jaxretrieval import plots
from jaxretrieval.config import base_config, validate_config
from jaxretrieval.config_keys import describe_config
from jaxretrieval.data.sources import load_dataset
from jaxretrieval.data.splits import split_dataset
from jaxretrieval.embed import Embedder
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.export import load_embedding_export
from jaxretrieval.metrics import retrieval_metrics_and_neighbours
from jaxretrieval.pipeline import (evaluate_and_index, evaluate_split,
                                   evaluate_split_and_neighbours, evaluation_rows,
                                   write_result_grid)
from jaxretrieval.reporting import RETRIEVAL_METRICS, MetricWriter, tensorboard_tag
from jaxretrieval.training import train, train_and_evaluate
from jaxretrieval.workdir import Workdir


def read_log(workdir):
    with open(Workdir(workdir).train_log_path) as f:
        return [json.loads(line) for line in f]


def tensorboard_scalars(logdir) -> dict:
    """{tag: [(step, value, wall_time), ...]} read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir)
    events.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def checkpoint_metrics(workdir, step, config):
    """The split's metrics of the checkpoint of `step`, evaluated from scratch."""
    dataset = load_dataset(config)
    split = split_dataset(config, dataset)
    rows = evaluation_rows(split)
    embeddings = Embedder.from_workdir(workdir, step=step).embed_uint8(dataset.images(rows))
    return evaluate_split(embeddings, dataset.labels, split, rows=rows)


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        return image.size


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, data_dir):
    """8 steps evaluated every 2, with TensorBoard, then the final evaluation."""
    workdir = str(tmp_path_factory.mktemp("reported") / "wd")
    config = tiny_config(data_dir, eval_every_steps=2, tensorboard=True)
    started = time.time()
    metrics = train_and_evaluate(config, workdir)
    return workdir, config, metrics, started, time.time()


def test_every_record_has_its_time_and_evaluations_come_between_the_steps(reported_run):
    workdir, _, metrics, started, ended = reported_run
    log = read_log(workdir)
    train_records = [r for r in log if r["kind"] == "train"]
    evals = [r for r in log if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]
    assert {"loss", "learning_rate", "images_per_sec"} <= set(train_records[0])
    # Every 2 steps while training (2, 4, 6); the last step's is the final evaluation's.
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    times = [r["time"] for r in log]
    assert all(isinstance(t, float) for t in times)
    assert times == sorted(times) and started <= times[0] and times[-1] <= ended
    for name in RETRIEVAL_METRICS + ("num_queries",):
        assert evals[-1][name] == metrics[name]
    # Training moves the embedding: the evaluations are not one number repeated.
    assert len({r["map@r"] for r in evals}) > 1


def test_an_evaluation_during_training_is_that_of_the_checkpoint_of_its_step(reported_run):
    workdir, config, _, _, _ = reported_run
    at_step_4 = next(r for r in read_log(workdir) if r["kind"] == "eval" and r["step"] == 4)
    expected = checkpoint_metrics(workdir, 4, config)  # checkpoint_every_steps = 4
    for name in RETRIEVAL_METRICS:
        assert at_step_4[name] == pytest.approx(expected[name], abs=1e-6), name


def test_tensorboard_holds_the_numbers_of_metrics_jsonl(reported_run):
    workdir, _, _, _, _ = reported_run
    scalars = tensorboard_scalars(Workdir(workdir).tensorboard)
    expected = {}
    for record in read_log(workdir):
        names = (("loss", "learning_rate", "images_per_sec") if record["kind"] == "train"
                 else RETRIEVAL_METRICS)
        for name in names:
            expected.setdefault(tensorboard_tag(record["kind"], name), []).append(
                (record["step"], record[name], record["time"]))
    assert "train/loss" in scalars and "eval/recall_at_1" in scalars and "eval/map_at_r" in scalars
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        got = scalars[tag]
        assert [step for step, _, _ in got] == [step for step, _, _ in points], tag
        # TensorBoard keeps float32 values and double wall times.
        np.testing.assert_allclose([v for _, v, _ in got], [v for _, v, _ in points],
                                   rtol=1e-6, err_msg=tag)
        assert [t for _, _, t in got] == pytest.approx([t for _, _, t in points], abs=1e-6)


def test_evaluating_again_leaves_one_record_of_the_checkpoint(reported_run, tmp_path):
    workdir, _, metrics, _, _ = reported_run
    workdir = str(shutil.copytree(workdir, tmp_path / "wd"))  # the module's run stays as it is
    before = read_log(workdir)
    again = evaluate_and_index(workdir)  # what --eval_only runs
    after = read_log(workdir)
    assert [(r["kind"], r["step"]) for r in after] == [(r["kind"], r["step"]) for r in before]
    assert after[:-1] == before[:-1] and after[-1]["time"] > before[-1]["time"]
    assert after[-1]["recall@1"] == again["recall@1"] == metrics["recall@1"]


def test_loss_png_and_results_png_are_written_at_the_end(reported_run):
    workdir, _, _, _, _ = reported_run
    wd = Workdir(workdir)
    width, height = png_size(wd.loss_plot_path)
    assert width >= 400 and height >= 300
    # Eight queries, each with eight hits beside it.
    assert png_size(wd.results_plot_path) == (
        round(9 * plots.COLUMN_INCHES * plots.DPI), round(8 * plots.ROW_INCHES * plots.DPI))


def test_a_shard_map_run_evaluates_before_its_last_step(tmp_path, data_dir):
    config = tiny_config(data_dir, parallel="shard_map", eval_every_steps=4)
    train(config, str(tmp_path / "wd"))  # training alone: no final evaluation
    evals = [r for r in read_log(tmp_path / "wd") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4]
    expected = checkpoint_metrics(str(tmp_path / "wd"), 4, config)
    assert evals[0]["map@r"] == pytest.approx(expected["map@r"], abs=1e-6)
    assert not os.path.exists(Workdir(tmp_path / "wd").tensorboard)  # tensorboard=False


@pytest.mark.parametrize("num_queries", [3, 5])
def test_the_result_grid_draws_the_queries_asked_with_their_nearest_hits(
        trained_workdir, tmp_path, num_queries):
    workdir, _ = trained_workdir
    config = Workdir(workdir).read_config()
    dataset, export = load_dataset(config), load_embedding_export(Workdir(workdir).embeddings)
    split = split_dataset(config, dataset)
    _, neighbours = evaluate_split_and_neighbours(export.embeddings, dataset.labels, split,
                                                  num_neighbours=4)
    path = str(tmp_path / "grid.png")
    rows = write_result_grid(path, dataset, split, neighbours, num_queries=num_queries)
    assert len(rows) == num_queries
    assert png_size(path) == (round(5 * plots.COLUMN_INCHES * plots.DPI),
                              round(num_queries * plots.ROW_INCHES * plots.DPI))
    # Each row is a query beside its 4 best gallery items, searched here by brute force.
    by_key = {key: i for i, key in enumerate(dataset.keys)}
    gallery = export.embeddings[split.gallery_rows]
    for row in rows:
        query = by_key[row.query_key]
        assert query in split.query_rows
        best = np.argsort(-(gallery @ export.embeddings[query]), kind="stable")[:4]
        assert [by_key[hit.key] for hit in row.hits] == list(split.gallery_rows[best])
        for hit in row.hits:
            assert hit.same_class == (dataset.labels[by_key[hit.key]] == dataset.labels[query])
            np.testing.assert_array_equal(hit.image, dataset.images([by_key[hit.key]])[0])
    # The green and red frames are drawn in proportion to the right and wrong hits.
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    def count(colour):
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        return int((pixels == rgb).all(axis=1).sum())
    same = sum(hit.same_class for row in rows for hit in row.hits)
    other = sum(not hit.same_class for row in rows for hit in row.hits)
    green, red = count(plots.SAME_COLOUR), count(plots.OTHER_COLOUR)
    assert same > 0 and green > 0
    per_frame = green / same
    assert red == pytest.approx(other * per_frame, rel=0.1, abs=per_frame * 0.1)


def test_neighbours_come_from_the_ranking_and_leave_the_query_itself_out():
    gallery = np.eye(4, dtype=np.float32)
    queries = np.array([[0.6, 0.8, 0, 0], [0, 0, 0.6, 0.8]], np.float32)
    metrics, neighbours = retrieval_metrics_and_neighbours(
        queries, np.array([1, 2]), gallery, np.array([0, 1, 2, 2]),
        query_gallery_rows=np.array([-1, 2]), num_neighbours=2)
    # Query 1 is gallery row 2 (score 0.6): left out, so row 0 (score 0, the lowest of the
    # tied rows) follows row 3.
    assert neighbours.rows.tolist() == [[1, 0], [3, 0]]
    np.testing.assert_allclose(neighbours.scores, [[0.8, 0.6], [0.8, 0.0]])
    assert metrics["recall@1"] == 1.0


def test_a_writer_that_is_not_enabled_writes_nothing(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=True, enabled=False) as writer:
        assert writer.write_training(1, loss=1.0, learning_rate=0.1, images_per_sec=5.0) == {}
        assert writer.write_evaluation(1, {"recall@1": 0.5}) == {}
    assert os.listdir(tmp_path) == []


def test_the_loss_plot_needs_a_training_record(tmp_path):
    path = str(tmp_path / "loss.png")
    assert not plots.plot_training([{"kind": "eval", "step": 0, "recall@1": 0.5}], path)
    assert not os.path.exists(path)
    # Records of runs from before `kind` existed are training records.
    assert plots.plot_training([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], path)
    assert png_size(path)[0] > 0


def test_the_keys_are_listed_and_checked():
    listing = describe_config(base_config())
    assert "eval_every_steps = 0  # every this many steps; 0: only the final evaluation" in listing
    assert "tensorboard = False  # True: also write TensorBoard event files" in listing
    config = base_config()
    config.eval_every_steps = -1
    with pytest.raises(JaxRetrievalError, match="eval_every_steps=-1"):
        validate_config(config)


def test_tensorboard_without_tensorboardx_is_one_error_saying_what_to_install(monkeypatch):
    import importlib.util
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboardX" else real_find_spec(name, *a))
    config = base_config()
    config.tensorboard = True
    with pytest.raises(JaxRetrievalError, match="pip install tensorboardX"):
        validate_config(config)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` fails
    with pytest.raises(JaxRetrievalError, match="pip install tensorboardX"):
        MetricWriter("unused", tensorboard=True)


class _Killed(Exception):
    pass


def test_a_resumed_run_shows_each_step_once_in_both_logs(tmp_path, data_dir):
    config = tiny_config(data_dir, log_every_steps=1, tensorboard=True)
    workdir = str(tmp_path / "wd")

    def kill_at_step_6(event):
        if event["step"] == 6:  # logged, past the step-4 checkpoint: resumes from step 4
            raise _Killed()

    with pytest.raises(_Killed):
        train(config, workdir, on_progress=kill_at_step_6)
    train(config, workdir)
    log = read_log(workdir)
    assert [r["step"] for r in log] == list(range(1, 9))
    losses = tensorboard_scalars(Workdir(workdir).tensorboard)["train/loss"]
    # TensorBoard hides the first attempt's steps 5 and 6, as metrics.jsonl dropped them.
    assert [step for step, _, _ in losses] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v, _ in losses], [r["loss"] for r in log], rtol=1e-6)
    assert [t for _, _, t in losses] == pytest.approx([r["time"] for r in log], abs=1e-6)
