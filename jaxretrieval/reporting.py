"""A run's metric records: each one a line of `DIR/metrics.jsonl`, stamped with its time,
and with `config.tensorboard` the same numbers as TensorBoard scalars in `DIR/tensorboard/`.

Two kinds of record, told apart by `kind` (docs/workdir.md lists them):

- `"train"`: step, time, loss, learning_rate, images_per_sec (every `log_every_steps`);
- `"eval"`: step, time, and the retrieval metrics of the split (recall@1/5/10, map@r,
  r_precision, num_queries), every `eval_every_steps` and at the final evaluation.

`time` is Unix time in seconds (UTC), the same number TensorBoard's events carry as their
wall time. In a run of several processes only process 0 writes (`enabled`).
"""

import os
import time
import uuid

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.workdir import Workdir

TRAIN, EVAL = "train", "eval"
TRAIN_SCALARS = ("loss", "learning_rate", "images_per_sec")
# The retrieval metrics an evaluation reports, in the order tables and plots show them.
RETRIEVAL_METRICS = ("recall@1", "recall@5", "recall@10", "map@r", "r_precision")


def tensorboard_tag(kind: str, name: str) -> str:
    """The TensorBoard tag of a record's number: `train/loss`, `eval/recall_at_1`,
    `eval/map_at_r` (TensorBoard's tags take no `@`)."""
    return f"{kind}/{name.replace('@', '_at_')}"


class MetricWriter:
    """Writes training and evaluation records to metrics.jsonl and, with `tensorboard`, to
    TensorBoard event files; a writer with `enabled=False` (processes other than 0) writes
    nothing.

    `resume_step`: the step a resumed run starts from; TensorBoard hides the events its
    earlier attempt logged past it, as metrics.jsonl drops those lines.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = False, enabled: bool = True,
                 resume_step: int = 0):
        self._wd = Workdir(workdir)
        self._enabled = enabled
        self._events = None
        if enabled and tensorboard:
            self._events = open_event_writer(self._wd.tensorboard,
                                             purge_step=resume_step + 1 if resume_step else None)

    def write_training(self, step: int, *, loss: float, learning_rate: float,
                       images_per_sec: float) -> dict:
        """Appends a training record; returns it ({} from a writer not enabled)."""
        if not self._enabled:
            return {}
        record = {"kind": TRAIN, "step": step, "time": time.time(), "loss": loss,
                  "learning_rate": learning_rate, "images_per_sec": images_per_sec}
        self._wd.append_train_log(record)
        self._add_scalars(record, TRAIN_SCALARS)
        return record

    def write_evaluation(self, step: int, metrics: dict, *, replace: bool = False) -> dict:
        """Appends an evaluation record of `metrics` (retrieval_metrics' keys; others are
        left out); returns it ({} from a writer not enabled). `replace`: an earlier
        evaluation record of the same step is dropped first, so evaluating a checkpoint
        again leaves one record of it."""
        if not self._enabled:
            return {}
        numbers = {name: metrics[name] for name in RETRIEVAL_METRICS + ("num_queries",)
                   if name in metrics}
        record = {"kind": EVAL, "step": step, "time": time.time(), **numbers}
        if replace:
            kept = [r for r in self._wd.read_train_log()
                    if not (r.get("kind") == EVAL and r.get("step") == step)]
            self._wd.write_train_log(kept + [record])
        else:
            self._wd.append_train_log(record)
        self._add_scalars(record, RETRIEVAL_METRICS)
        return record

    def _add_scalars(self, record, names) -> None:
        if self._events is None:
            return
        for name in names:
            if name in record:
                self._events.add_scalar(tensorboard_tag(record["kind"], name), record[name],
                                        record["step"], walltime=record["time"])
        self._events.flush()  # TensorBoard shows each record as it is written

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_event_writer(logdir: str, *, purge_step: int | None = None):
    """A tensorboardX SummaryWriter on `logdir`, in a file of its own (a training and the
    evaluation after it may open theirs within the same second, which tensorboardX's file
    names alone would not tell apart)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise JaxRetrievalError(
            "tensorboard=True writes its event files with tensorboardX, which is not "
            "installed: `pip install tensorboardX`, or set --config.tensorboard=false") from err
    os.makedirs(logdir, exist_ok=True)
    return SummaryWriter(logdir, purge_step=purge_step,
                         filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
