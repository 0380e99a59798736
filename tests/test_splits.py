"""The evaluation protocols (`config.split`) and the training batches drawn from a split."""

import types

import numpy as np
import pytest

from jaxretrieval.data.splits import (SPLITS, batch_rows, class_balanced_batch_rows,
                                      make_split, split_dataset)
from jaxretrieval.errors import JaxRetrievalError


def assert_rows_partition(split, count):
    """Rows are ascending integer indices below `count`, training and query rows disjoint."""
    for rows in (split.train_rows, split.query_rows, split.gallery_rows):
        assert rows.dtype.kind == "i" and np.all(np.diff(rows) > 0)
        assert rows.size == 0 or 0 <= rows.min() <= rows.max() < count
    assert not set(split.train_rows) & set(split.query_rows)


def test_held_out_images_split_is_per_class_seeded_and_disjoint():
    labels = np.repeat(np.arange(5), 10)
    a = make_split(labels, "held_out_images", seed=3, query_fraction=0.2)
    b = make_split(labels, "held_out_images", seed=3, query_fraction=0.2)
    c = make_split(labels, "held_out_images", seed=4, query_fraction=0.2)
    np.testing.assert_array_equal(a.query_rows, b.query_rows)
    assert not np.array_equal(a.query_rows, c.query_rows)
    assert np.bincount(labels[a.query_rows]).tolist() == [2] * 5
    assert not set(a.query_rows) & set(a.train_rows)
    np.testing.assert_array_equal(a.gallery_rows, a.train_rows)
    assert (a.query_gallery_rows == -1).all() and a.num_train_classes == 5


def test_unseen_classes_split_trains_on_the_lower_half_of_the_label_indices():
    labels = np.repeat(np.arange(15), 3)  # 15 classes, as in yalefaces: train on 0..6
    split = make_split(labels, "unseen_classes", seed=0)
    assert split.num_train_classes == 7
    assert set(labels[split.train_rows]) == set(range(7))
    assert set(labels[split.query_rows]) == set(range(7, 15))
    np.testing.assert_array_equal(split.query_rows, split.gallery_rows)
    np.testing.assert_array_equal(split.query_gallery_rows, np.arange(len(split.query_rows)))


def test_batch_rows_depend_on_seed_and_step_alone_and_cover_each_epoch():
    rows = np.arange(100, 110)
    first_epoch = np.concatenate([batch_rows(rows, step, 5, seed=1) for step in range(2)])
    assert sorted(first_epoch.tolist()) == rows.tolist()
    np.testing.assert_array_equal(batch_rows(rows, 7, 4, seed=1), batch_rows(rows, 7, 4, seed=1))
    # A batch straddling two epochs takes the end of one permutation and the start of the next.
    straddling = batch_rows(rows, 2, 4, seed=1)  # positions 8..11
    assert straddling.tolist()[:2] == batch_rows(rows, 0, 10, seed=1).tolist()[8:]


def test_class_balanced_batches_hold_p_classes_of_k_images():
    labels = np.repeat(np.arange(10), [6, 6, 6, 6, 6, 6, 6, 6, 6, 2])
    rows = np.arange(len(labels)) + 1000  # rows are dataset rows, not positions
    batch = class_balanced_batch_rows(rows, labels, step=5, batch_size=16, images_per_class=4,
                                      seed=0)
    batch_labels = labels[batch - 1000]
    assert len(batch) == 16
    assert sorted(np.bincount(batch_labels, minlength=10)[np.unique(batch_labels)]) == [4] * 4
    for chunk in batch_labels.reshape(4, 4):  # class by class
        assert len(set(chunk)) == 1
    again = class_balanced_batch_rows(rows, labels, 5, 16, 4, seed=0)
    np.testing.assert_array_equal(batch, again)  # a function of (seed, step) alone
    other = class_balanced_batch_rows(rows, labels, 6, 16, 4, seed=0)
    assert not np.array_equal(batch, other)
    # A class with fewer than K images is drawn with replacement; others never repeat a row.
    many = np.concatenate([class_balanced_batch_rows(rows, labels, s, 16, 4, 0)
                           for s in range(50)]).reshape(-1, 4)
    for chunk in many:
        if labels[chunk[0] - 1000] != 9:
            assert len(set(chunk)) == 4


def test_held_out_images_takes_the_query_fraction_of_each_class_and_keeps_one_to_train():
    sizes = [1, 2, 3, 10, 25]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(0).shuffle(labels)  # classes interleaved, as in a real dataset
    split = make_split(labels, "held_out_images", seed=0, query_fraction=0.3)
    assert_rows_partition(split, len(labels))
    assert len(split.train_rows) + len(split.query_rows) == len(labels)
    queries = np.bincount(labels[split.query_rows], minlength=len(sizes))
    for size, count in zip(sizes, queries):
        if size == 1:
            assert count == 0  # a lone image could never find a match as a query
        else:
            assert count == min(size - 1, max(1, round(0.3 * size)))
    train = np.bincount(labels[split.train_rows], minlength=len(sizes))
    assert (train >= 1).all()  # every class keeps an image in the gallery


def test_held_out_images_counts_classes_without_images():
    labels = np.array([0, 0, 2, 2])  # class 1 has no images
    split = make_split(labels, "held_out_images", seed=0, num_classes=4)
    assert split.num_train_classes == 4
    assert sorted(labels[split.query_rows].tolist()) == [0, 2]


def test_unseen_classes_with_an_odd_class_count_trains_on_the_smaller_half():
    labels = np.repeat(np.arange(5), 2)[::-1]
    split = make_split(labels, "unseen_classes", seed=0)
    assert split.num_train_classes == 2
    assert set(labels[split.train_rows]) == {0, 1}
    assert set(labels[split.query_rows]) == {2, 3, 4}
    assert_rows_partition(split, len(labels))
    # The seed plays no part: the classes are split by label index.
    again = make_split(labels, "unseen_classes", seed=9)
    np.testing.assert_array_equal(again.query_rows, split.query_rows)


def test_unseen_classes_needs_two_classes():
    with pytest.raises(JaxRetrievalError, match="at least 2 classes, the dataset has 1"):
        make_split(np.zeros(4, np.int64), "unseen_classes", seed=0)


def test_dataset_splits_trains_on_train_keys_and_evaluates_leave_one_out_on_test_keys():
    keys = ["test/0", "train/0", "train/1", "test/1", "test/2", "train/2", "validation/0"]
    labels = np.array([5, 0, 3, 5, 6, 1, 4])
    split = make_split(labels, "dataset_splits", seed=0, keys=keys)
    assert split.train_rows.tolist() == [1, 2, 5]
    assert split.query_rows.tolist() == [0, 3, 4]
    np.testing.assert_array_equal(split.gallery_rows, split.query_rows)
    assert split.query_gallery_rows.tolist() == [0, 1, 2]
    assert split.num_train_classes == 4  # the largest training label + 1


@pytest.mark.parametrize("keys", [None, ["train/0", "train/1"], ["test/0", "test/1"],
                                  ["0", "1"]])
def test_dataset_splits_without_a_train_and_a_test_split_says_what_to_use(keys):
    with pytest.raises(JaxRetrievalError, match="needs a TFDS dataset with `train` and `test`"):
        make_split(np.array([0, 1]), "dataset_splits", seed=0, keys=keys)


def test_an_unknown_split_names_every_known_one():
    with pytest.raises(JaxRetrievalError, match="split='random'; use one of " +
                       ", ".join(SPLITS)) as error:
        make_split(np.array([0, 1]), "random", seed=0)
    for name in ("held_out_images", "unseen_classes", "dataset_splits"):
        assert name in str(error.value)


def test_split_dataset_reads_the_configs_split_seed_and_fraction():
    labels = np.repeat(np.arange(4), 10)
    dataset = types.SimpleNamespace(labels=labels, num_classes=6,
                                    keys=[f"train/{i}" for i in range(40)])
    config = types.SimpleNamespace(split="held_out_images", seed=5, query_fraction=0.5)
    split = split_dataset(config, dataset)
    expected = make_split(labels, "held_out_images", seed=5, query_fraction=0.5,
                          num_classes=6)
    np.testing.assert_array_equal(split.query_rows, expected.query_rows)
    assert len(split.query_rows) == 20 and split.num_train_classes == 6
