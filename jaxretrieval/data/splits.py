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


def _held_out_images(labels, *, seed, query_fraction, num_classes, keys) -> Split:
    """A `query_fraction` of each class's images are the queries, the rest train and are
    the gallery."""
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


def _unseen_classes(labels, *, seed, query_fraction, num_classes, keys) -> Split:
    """Train on the lower half of the label indices; evaluate leave-one-out on the rest."""
    num_train_classes = num_classes // 2
    if num_train_classes < 1:
        raise JaxRetrievalError(
            f"split=unseen_classes needs at least 2 classes, the dataset has {num_classes}")
    train_rows = np.flatnonzero(labels < num_train_classes)
    eval_rows = np.flatnonzero(labels >= num_train_classes)
    return Split(train_rows, eval_rows, eval_rows, np.arange(len(eval_rows)),
                 num_train_classes)


def _dataset_splits(labels, *, seed, query_fraction, num_classes, keys) -> Split:
    """The dataset's own class-disjoint splits, read from the item keys (`split/index`):
    train on `train/...`, evaluate leave-one-out on `test/...`."""
    split_names = np.array([key.split("/", 1)[0] for key in (keys or [])])
    train_rows = np.flatnonzero(split_names == "train")
    eval_rows = np.flatnonzero(split_names == "test")
    if not len(train_rows) or not len(eval_rows):
        raise JaxRetrievalError(
            "split=dataset_splits needs a TFDS dataset with `train` and `test` splits; "
            "use held_out_images or unseen_classes for this dataset")
    return Split(train_rows, eval_rows, eval_rows, np.arange(len(eval_rows)),
                 int(labels[train_rows].max()) + 1)


# The protocols `config.split` may name.
SPLITS = {
    "held_out_images": _held_out_images,
    "unseen_classes": _unseen_classes,
    "dataset_splits": _dataset_splits,
}


def make_split(labels: np.ndarray, split: str, *, seed: int, query_fraction: float = 0.2,
               num_classes: int | None = None, keys=None) -> Split:
    """The split called `split` (a key of `SPLITS`) over `labels`.

    `num_classes` is the dataset's class count (default: the largest label + 1); `keys` are
    the item keys, which `dataset_splits` reads.
    """
    if split not in SPLITS:
        raise JaxRetrievalError(f"bad config: split={split!r}; use one of {', '.join(SPLITS)}")
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return SPLITS[split](labels, seed=seed, query_fraction=query_fraction,
                         num_classes=num_classes, keys=keys)


def split_dataset(config, dataset) -> Split:
    """The split `config.split` of an ImageDataset, as training and evaluation both use it."""
    return make_split(dataset.labels, config.split, seed=config.seed,
                      query_fraction=config.query_fraction, num_classes=dataset.num_classes,
                      keys=dataset.keys)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which dataset rows make each global training batch: `rows(step)` is a function of
    (seed, step) alone, so every loader, process and resumed run reads the same batches."""

    train_rows: np.ndarray
    train_labels: np.ndarray  # the labels of train_rows
    sampler: str  # random | class_balanced
    batch_size: int  # global
    images_per_class: int
    seed: int

    def rows(self, step: int) -> np.ndarray:
        if self.sampler == "class_balanced":
            return class_balanced_batch_rows(self.train_rows, self.train_labels, step,
                                             self.batch_size, self.images_per_class, self.seed)
        return batch_rows(self.train_rows, step, self.batch_size, self.seed)


def batch_plan(config, split: Split, labels: np.ndarray) -> BatchPlan:
    """The training batches of `config` over `split` of a dataset with `labels`."""
    return BatchPlan(split.train_rows, labels[split.train_rows], config.sampler,
                     config.global_batch_size, config.images_per_class, config.seed)


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


def class_balanced_batch_rows(train_rows: np.ndarray, train_labels: np.ndarray, step: int,
                              batch_size: int, images_per_class: int, seed: int) -> np.ndarray:
    """P classes x K images: the rows of global batch `step`, from (seed, step) alone.

    P = batch_size / K classes are drawn without replacement (with replacement only when the
    split has fewer classes), then K images of each (without replacement when the class has
    K or more). Rows come class by class, so every class has its K images in the batch.
    """
    classes, inverse = np.unique(train_labels, return_inverse=True)
    num_classes_needed = batch_size // images_per_class
    rng = np.random.default_rng([seed, step, 1])  # 1: a stream apart from batch_rows's
    chosen = rng.choice(len(classes), num_classes_needed,
                        replace=len(classes) < num_classes_needed)
    out = []
    for class_index in chosen:
        members = train_rows[inverse == class_index]
        out.append(rng.choice(members, images_per_class,
                              replace=len(members) < images_per_class))
    return np.concatenate(out).astype(np.int64)
