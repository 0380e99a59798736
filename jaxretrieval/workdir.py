"""The run directory's layout (DESIGN.md, Workdir) and writing into it safely."""

import json
import math
import os
import tempfile

from jaxretrieval.errors import JaxRetrievalError


def write_file_atomically(path: str, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, then renames it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomically(path: str, value) -> None:
    write_file_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


class Workdir:
    """Paths inside a run directory: config, checkpoints, embeddings, index, metrics."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    @property
    def config_path(self):
        return os.path.join(self.path, "config.json")

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
        from jaxretrieval.config import config_from_json

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


def new_sibling_directory(final_dir: str) -> str:
    """An empty temporary directory beside `final_dir`, to fill and then `swap_in`."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final_dir)}.tmp-")


def swap_in(tmp_dir: str, final_dir: str) -> None:
    """Replaces `final_dir` by the finished `tmp_dir`; the old one is removed only after.

    `final_dir` never holds a half-written directory. Between the two renames it is briefly
    absent; a process killed right there leaves the old copy beside it, which
    `recover_interrupted_swap` (called by every reader and by the next swap) puts back.
    """
    import shutil

    recover_interrupted_swap(final_dir)
    old = None
    if os.path.exists(final_dir):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(final_dir)),
                               prefix=f".{os.path.basename(final_dir)}.old-")
        os.rmdir(old)
        os.rename(final_dir, old)
    try:
        os.rename(tmp_dir, final_dir)
    except BaseException:
        if old is not None:
            os.rename(old, final_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swap(final_dir: str) -> None:
    """Puts back the old copy of `final_dir` if a swap was killed between its two renames."""
    if os.path.exists(final_dir):
        return
    parent = os.path.dirname(os.path.abspath(final_dir))
    prefix = f".{os.path.basename(final_dir)}.old-"
    leftovers = sorted((e for e in os.scandir(parent) if e.name.startswith(prefix))
                       if os.path.isdir(parent) else [], key=lambda e: e.stat().st_mtime)
    if leftovers:
        os.rename(leftovers[-1].path, final_dir)
