"""The run directory's layout: where a run keeps its config, checkpoints, embeddings,
index and metrics."""

import json
import math
import os

from jaxretrieval.config import CONFIG_FILE_NAME, config_from_json
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.fileio import write_file_atomically


class Workdir:
    """Paths inside a run directory: config, checkpoints, embeddings, index, metrics, the
    train log, TensorBoard's events and the plots."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    @property
    def config_path(self):
        return os.path.join(self.path, CONFIG_FILE_NAME)

    @property
    def checkpoints(self):
        return os.path.join(self.path, "checkpoints")

    @property
    def embeddings(self):
        return os.path.join(self.path, "embeddings")

    @property
    def index(self):
        return os.path.join(self.path, "index")

    @property
    def metrics_path(self):
        return os.path.join(self.path, "metrics.json")

    @property
    def train_log_path(self):
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def tensorboard(self):
        return os.path.join(self.path, "tensorboard")

    @property
    def loss_plot_path(self):
        return os.path.join(self.path, "loss.png")

    @property
    def results_plot_path(self):
        return os.path.join(self.path, "results.png")

    def read_config(self):
        """The run's config from DIR/config.json."""
        if not os.path.isfile(self.config_path):
            raise JaxRetrievalError(
                f"{self.path!r} is not a training workdir (no config.json): train into it "
                f"with `python -m train --workdir {self.path}`")
        with open(self.config_path) as f:
            return config_from_json(f.read())

    def append_train_log(self, record: dict) -> None:
        """One line of metrics.jsonl (non-finite numbers become null, so it stays JSON)."""
        os.makedirs(self.path, exist_ok=True)
        with open(self.train_log_path, "a") as f:
            f.write(_log_line(record))

    def read_train_log(self) -> list:
        """The records of metrics.jsonl, in order; [] without one. A line cut short by a
        kill is left out."""
        if not os.path.isfile(self.train_log_path):
            return []
        with open(self.train_log_path) as f:
            lines = [line for line in f if line.strip()]
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return records

    def write_train_log(self, records) -> None:
        """Replaces metrics.jsonl by `records`, atomically."""
        write_file_atomically(self.train_log_path, "".join(_log_line(r) for r in records))

    def truncate_train_log(self, after_step: int) -> None:
        """Drops lines past `after_step`: a resumed run logs those steps again."""
        if not os.path.isfile(self.train_log_path):
            return
        with open(self.train_log_path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if _logged_step(line) <= after_step]
        if len(kept) != len(lines):
            write_file_atomically(self.train_log_path, "".join(kept))


def _log_line(record: dict) -> str:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in record.items()}
    return json.dumps(clean) + "\n"


def _logged_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf  # a line cut short by a kill: drop it
