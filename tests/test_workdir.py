"""The run directory (jaxretrieval.workdir.Workdir): its config and its training log."""

import json
import os

import pytest

from jaxretrieval.config import base_config, config_to_json
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.workdir import Workdir


def test_paths_are_absolute_and_inside_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wd = Workdir("runs/a")
    assert wd.path == str(tmp_path / "runs" / "a")
    for path in (wd.config_path, wd.checkpoints, wd.embeddings, wd.index, wd.metrics_path,
                 wd.train_log_path):
        assert os.path.dirname(path) == wd.path
    assert len({wd.config_path, wd.metrics_path, wd.train_log_path}) == 3


def test_read_config_round_trips_and_refuses_a_folder_without_one(tmp_path):
    config = base_config()
    config.seed, config.model.widths = 5, (8, 16)
    wd = Workdir(tmp_path / "wd")
    os.makedirs(wd.path)
    with pytest.raises(JaxRetrievalError, match="not a training workdir.*python -m train"):
        wd.read_config()
    with open(wd.config_path, "w") as f:
        f.write(config_to_json(config))
    assert wd.read_config() == config


def test_the_train_log_keeps_json_for_non_finite_numbers(tmp_path):
    wd = Workdir(tmp_path / "new")  # created by the first line
    wd.append_train_log({"step": 1, "loss": float("nan"), "images_per_sec": float("inf")})
    wd.append_train_log({"step": 2, "loss": 0.5})
    with open(wd.train_log_path) as f:
        assert [json.loads(line) for line in f] == [
            {"step": 1, "loss": None, "images_per_sec": None}, {"step": 2, "loss": 0.5}]


def test_truncating_the_log_drops_later_steps_and_a_line_cut_short(tmp_path):
    wd = Workdir(tmp_path)
    for step in (2, 4, 6):
        wd.append_train_log({"step": step})
    with open(wd.train_log_path, "a") as f:
        f.write('{"step": 8, "lo')  # a kill while writing
    wd.truncate_train_log(after_step=4)
    with open(wd.train_log_path) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]
    wd.truncate_train_log(after_step=100)  # nothing past it: left as it is
    with open(wd.train_log_path) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]
    Workdir(tmp_path / "empty").truncate_train_log(after_step=0)  # no log: no error
