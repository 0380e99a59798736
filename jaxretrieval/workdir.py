"""The run directory's layout: where a run keeps its config, checkpoints, embeddings,
index and metrics."""

import json
import math
import os

from jaxretrieval.config import CONFIG_FILE_NAME, config_from_json
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.fileio import write_file_atomically


class Workdir:
    """Paths inside a run directory: config, checkpoints, embeddings, index, metrics."""

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
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        os.makedirs(self.path, exist_ok=True)
        with open(self.train_log_path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def truncate_train_log(self, after_step: int) -> None:
        """Drops lines past `after_step`: a resumed run logs those steps again."""
        if not os.path.isfile(self.train_log_path):
            return
        with open(self.train_log_path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if _logged_step(line) <= after_step]
        if len(kept) != len(lines):
            write_file_atomically(self.train_log_path, "".join(kept))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf  # a line cut short by a kill: drop it
