"""The evaluation protocols (`config.split`) and the training batches drawn from a split."""

import dataclasses

import numpy as np

from jaxretrieval.errors import JaxRetrievalError


@dataclasses.dataclass(frozen=True)
class Split:
    """Rows of the dataset for training and evaluation.

    `query_gallery_rows[i]` is the position in `gallery_rows` of query i itself (leave-one-out,
    excluded from its own ranking), or -1 when the query is not in the gallery.
    """

    train_rows: np.ndarray
    query_rows: np.ndarray
    gallery_rows: np.ndarray
    query_gallery_rows: np.ndarray
    num_train_classes: int


def make_split(labels: np.ndarray, split: str, *, seed: int, query_fraction: float = 0.2,
               num_classes: int | None = None) -> Split:
    """Builds `held_out_images` or `unseen_classes` over `labels` (label-index order).

    `num_classes` is the dataset's class count (default: the largest label + 1).
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if split == "held_out_images":
        rng = np.random.default_rng(seed)
        query_mask = np.zeros(len(labels), bool)
        for label in range(num_classes):
            rows = np.flatnonzero(labels == label)
            if len(rows) < 2:
                continue  # a lone image is training data: as a query it could never hit
            count = min(len(rows) - 1, max(1, int(round(query_fraction * len(rows)))))
            query_mask[rng.permutation(rows)[:count]] = True
        train_rows = np.flatnonzero(~query_mask)
        query_rows = np.flatnonzero(query_mask)
        return Split(train_rows, query_rows, train_rows,
                     np.full(len(query_rows), -1, np.int64), num_classes)
    if split == "unseen_classes":
        num_train_classes = num_classes // 2
        if num_train_classes < 1:
            raise JaxRetrievalError(
                f"split=unseen_classes needs at least 2 classes, the dataset has {num_classes}")
        train_rows = np.flatnonzero(labels < num_train_classes)
        eval_rows = np.flatnonzero(labels >= num_train_classes)
        return Split(train_rows, eval_rows, eval_rows, np.arange(len(eval_rows)),
                     num_train_classes)
    raise JaxRetrievalError(f"bad config: split={split!r}; use held_out_images or unseen_classes")


def batch_rows(train_rows: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The dataset rows of global batch `step`: a function of (seed, step) alone.

    The training rows are read as an endless stream of epochs, each a fresh seeded
    permutation; any process can compute any step's batch, so resuming needs no sampler state.
    """
    n = len(train_rows)
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        permutation = np.random.default_rng([seed, int(epoch)]).permutation(n)
        chosen = epochs == epoch
        out[chosen] = train_rows[permutation[offsets[chosen]]]
    return out
