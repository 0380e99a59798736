"""The run directory's layout (DESIGN.md, Workdir) and writing into it safely."""

import json
import math
import os
import tempfile


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
        kept = [line for line in lines if json.loads(line).get("step", 0) <= after_step]
        if len(kept) != len(lines):
            write_file_atomically(self.train_log_path, "".join(kept))


def new_sibling_directory(final_dir: str) -> str:
    """An empty temporary directory beside `final_dir`, to fill and then `swap_in`."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final_dir)}.tmp-")


def swap_in(tmp_dir: str, final_dir: str) -> None:
    """Replaces `final_dir` by the finished `tmp_dir`; the old one is removed only after.

    Either the old or the new directory is in place at every moment, never a half-written one.
    """
    import shutil

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
