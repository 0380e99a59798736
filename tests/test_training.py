"""Training under pmap and shard_map, resuming, restoring on another device count, divergence."""

import json
import os
import re

import jax
import numpy as np
import pytest

from conftest import run_python, tiny_config
from jaxretrieval.checkpoint import CheckpointStore
from jaxretrieval.export import load_embedding_export
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import snapshot_directory
from jaxretrieval.training import train
from jaxretrieval.workdir import Workdir


def final_params(workdir):
    with CheckpointStore(Workdir(workdir).checkpoints, read_only=True) as store:
        return store.latest_step(), store.restore()["params"]


def assert_trees_close(a, b, atol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_four_device_run_trains_evaluates_and_indexes(trained_workdir):
    workdir, metrics = trained_workdir
    assert jax.local_device_count() == 4
    wd = Workdir(workdir)
    for path in (wd.config_path, wd.metrics_path, wd.train_log_path,
                 os.path.join(snapshot_directory(wd.index), "manifest.json")):
        assert os.path.isfile(path), path
    for name in ("recall@1", "recall@5", "recall@10", "map@r", "r_precision"):
        assert 0.0 <= metrics[name] <= 1.0
        assert 0.0 <= metrics["pixels/" + name] <= 1.0
    # Even 8 steps of a tiny model must find same-digit neighbours far above chance (0.1).
    assert metrics["recall@1"] > 0.5
    with open(wd.train_log_path) as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log if r["kind"] == "train"] == [2, 4, 6, 8]
    assert {"step", "loss", "learning_rate", "images_per_sec"} <= set(log[0])
    assert (log[-1]["kind"], log[-1]["step"]) == ("eval", 8)  # the final evaluation's record
    manifest = json.load(open(os.path.join(snapshot_directory(wd.index), "manifest.json")))
    assert manifest["count"] == 1797 and manifest["checkpoint_step"] == 8
    assert manifest["embedding_dim"] == 16


def test_pmap_and_shard_map_give_the_same_parameters(tmp_path, data_dir):
    config = tiny_config(data_dir, num_train_steps=4)
    train(config, str(tmp_path / "pmap"))
    config.parallel = "shard_map"
    train(config, str(tmp_path / "shard_map"))
    step_a, params_a = final_params(tmp_path / "pmap")
    step_b, params_b = final_params(tmp_path / "shard_map")
    assert step_a == step_b == 4
    assert_trees_close(params_a, params_b, atol=1e-5)


class _Killed(Exception):
    pass


def test_a_stopped_and_resumed_run_ends_where_an_unbroken_one_does(tmp_path, data_dir):
    config = tiny_config(data_dir, num_train_steps=10, log_every_steps=1,
                         checkpoint_every_steps=4, checkpoints_to_keep=2)
    train(config, str(tmp_path / "unbroken"))

    def kill_at_step_6(event):
        if event["step"] == 6:  # after the step-4 checkpoint, before the step-8 one
            raise _Killed()

    with pytest.raises(_Killed):
        train(config, str(tmp_path / "resumed"), on_progress=kill_at_step_6)
    assert final_params(tmp_path / "resumed")[0] == 4
    train(config, str(tmp_path / "resumed"))  # the same command again: resumes at step 4

    step_a, params_a = final_params(tmp_path / "unbroken")
    step_b, params_b = final_params(tmp_path / "resumed")
    assert step_a == step_b == 10
    assert_trees_close(params_a, params_b, atol=1e-6)
    # Saved every 4 steps and at the end, the last 2 kept.
    assert sorted(int(name) for name in os.listdir(Workdir(tmp_path / "unbroken").checkpoints)
                  if name.isdigit()) == [8, 10]
    with open(Workdir(tmp_path / "resumed").train_log_path) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 11))


def test_checkpoint_from_four_devices_restores_and_embeds_on_one(trained_workdir):
    workdir, _ = trained_workdir
    code = (
        "import sys, jax\n"
        "from jaxretrieval.embed import Embedder\n"
        "from jaxretrieval.export import write_embedding_export\n"
        "from jaxretrieval.data.sources import load_dataset\n"
        "assert jax.local_device_count() == 1\n"
        "e = Embedder.from_workdir(sys.argv[1])\n"
        "write_embedding_export(sys.argv[2], e, load_dataset(e.config), chunk_size=500)\n")
    out = os.path.join(workdir, "..", "one_device_export")
    result = run_python(code, workdir, out, devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    on_one = load_embedding_export(out)
    assert on_one.metadata["num_chunks"] == 4  # 1797 items in chunks of 500
    export = load_embedding_export(Workdir(workdir).embeddings)
    np.testing.assert_allclose(on_one.embeddings, export.embeddings, atol=1e-5)


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_good_checkpoint(
        tmp_path, data_dir):
    config = tiny_config(data_dir, num_train_steps=4, log_every_steps=1,
                         checkpoint_every_steps=2, warmup_steps=0)
    train(config, str(tmp_path / "wd"))
    good_step, good_params = final_params(tmp_path / "wd")
    assert good_step == 4
    # Continue the same run to step 12 with an absurd learning rate: it must blow up.
    config.num_train_steps = 12
    config.learning_rate = 1e38
    with pytest.raises(JaxRetrievalError, match=r"not finite at step (\d+)") as info:
        train(config, str(tmp_path / "wd"))
    message = str(info.value)
    assert "last good checkpoint" in message
    diverged_at = int(re.search(r"not finite at step (\d+)", message).group(1))
    step, params = final_params(tmp_path / "wd")
    assert 4 <= step < diverged_at
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_a_batch_that_does_not_divide_over_the_devices_is_refused(tmp_path, data_dir):
    config = tiny_config(data_dir, global_batch_size=30)  # 4 devices
    with pytest.raises(JaxRetrievalError, match="batch of 30 .* multiple of 4"):
        train(config, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")  # refused before anything is written


def test_a_workdir_of_another_run_is_refused(tmp_path, data_dir):
    train(tiny_config(data_dir, num_train_steps=2), str(tmp_path / "wd"))
    config_before = open(Workdir(tmp_path / "wd").config_path).read()
    with pytest.raises(JaxRetrievalError, match=r"another configuration \(embedding_dim"):
        train(tiny_config(data_dir, num_train_steps=2, embedding_dim=8), str(tmp_path / "wd"))
    with pytest.raises(JaxRetrievalError, match=r"another configuration \(split"):
        train(tiny_config(data_dir, num_train_steps=2, split="unseen_classes"),
              str(tmp_path / "wd"))
    # A projection head changes the checkpoint's loss parameters.
    with pytest.raises(JaxRetrievalError, match=r"another configuration \(projection_head"):
        train(tiny_config(data_dir, num_train_steps=2, projection_head=8),
              str(tmp_path / "wd"))
    # A video dataset's sampling decides which frames the rows of each step are.
    with pytest.raises(JaxRetrievalError, match=r"another configuration \(video_rate"):
        train(tiny_config(data_dir, num_train_steps=2, video_rate=2.0), str(tmp_path / "wd"))
    assert open(Workdir(tmp_path / "wd").config_path).read() == config_before


def test_embedding_export_holds_every_item_with_keys_and_sources(trained_workdir):
    workdir, _ = trained_workdir
    export = load_embedding_export(Workdir(workdir).embeddings)
    assert export.embeddings.shape == (1797, 16)
    assert export.labels.dtype == np.int64 and list(export.labels[:3]) == [0, 1, 2]
    assert export.keys[:2] == ["train/0", "train/1"]
    assert export.sources[0] == "tfds:sklearn_digits/train/0"
    np.testing.assert_allclose(np.linalg.norm(export.embeddings, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("loss, projection_head", [("triplet", 0), ("softmax+triplet", 32)])
def test_a_pair_loss_on_class_balanced_batches_trains_on_four_devices(
        tmp_path, data_dir, loss, projection_head):
    from jaxretrieval.pipeline import evaluate_and_index

    config = tiny_config(data_dir, loss=loss, projection_head=projection_head,
                         sampler="class_balanced", images_per_class=4, num_train_steps=12,
                         log_every_steps=12, split="unseen_classes")
    train(config, str(tmp_path / "wd"))
    with open(Workdir(tmp_path / "wd").train_log_path) as f:
        assert np.isfinite(json.loads(f.readline())["loss"])
    # The loss's learned parameters are checkpointed: the head, and each term's own.
    loss_params = final_params(tmp_path / "wd")[1]["loss"]
    if projection_head:
        assert set(loss_params) == {"head", "loss"}
        assert set(loss_params["loss"]) == {"softmax", "triplet"}
        assert loss_params["head"]["hidden"]["kernel"].shape == (16, projection_head)
    else:
        assert loss_params == {}
    metrics = evaluate_and_index(str(tmp_path / "wd"))
    # Digits 5-9 were never trained on; a dozen triplet steps already rank them above chance.
    assert metrics["split"] == "unseen_classes" and metrics["recall@1"] > 0.5


def test_a_run_that_fails_early_leaves_nothing_that_refuses_the_corrected_one(
        tmp_path, data_dir):
    workdir = str(tmp_path / "wd")
    with pytest.raises(JaxRetrievalError, match="not found"):
        train(tiny_config(data_dir, dataset=str("folder:" + str(tmp_path / "missing"))),
              workdir)
    with pytest.raises(JaxRetrievalError, match="unknown loss 'bogus'"):
        train(tiny_config(data_dir, loss="bogus"), workdir)
    assert not os.path.exists(Workdir(workdir).config_path)
    # A config.json of a run that stopped before its first checkpoint does not bind the
    # workdir either: the corrected command takes it over.
    os.makedirs(workdir, exist_ok=True)
    from jaxretrieval.config import config_to_json
    with open(Workdir(workdir).config_path, "w") as f:
        f.write(config_to_json(tiny_config(data_dir, embedding_dim=8)))
    train(tiny_config(data_dir, num_train_steps=2), workdir)
    assert Workdir(workdir).read_config().embedding_dim == 16
