"""Image sources (folder, digits as TFDS), splits and batch order."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import YALEFACES, tiny_config
from jaxretrieval.data.images import load_images
from jaxretrieval.data.sources import load_dataset, read_source
from jaxretrieval.data.splits import batch_rows, make_split
from jaxretrieval.errors import JaxRetrievalError


def folder_config(path, **overrides):
    return tiny_config("", dataset=f"folder:{path}", **overrides)


@pytest.mark.skipif(not os.path.isdir(YALEFACES), reason="../shared/data/yalefaces not present")
def test_folder_source_reads_yalefaces_in_sorted_class_order():
    dataset = load_dataset(folder_config(YALEFACES, image_size=32))
    assert len(dataset) == 164 and dataset.num_classes == 15
    assert dataset.class_names[0] == "subject01" and dataset.class_names[-1] == "subject15"
    assert np.bincount(dataset.labels).tolist() == [10] + [11] * 14  # subject01 lacks one
    assert dataset.keys[0] == "subject01/glasses.gif"
    assert dataset.sources[0] == os.path.join(YALEFACES, "subject01", "glasses.gif")
    images = dataset.images([0, 163])
    assert images.shape == (2, 32, 32, 1) and images.dtype == np.uint8
    assert images.std() > 10  # real faces, not blank


def test_folder_source_converts_any_format_and_colour(tmp_path):
    rng = np.random.default_rng(0)
    for class_name, ext in (("a", ".png"), ("b", ".jpg"), ("c", ".gif")):
        os.makedirs(tmp_path / class_name)
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / class_name / f"{i}{ext}")
    (tmp_path / "a" / "notes.txt").write_text("not an image, skipped")
    dataset = load_dataset(folder_config(tmp_path, channels=3, image_size=12))
    assert dataset.keys == [f"{c}/{i}{e}" for c, e in (("a", ".png"), ("b", ".jpg"), ("c", ".gif"))
                            for i in range(3)]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert dataset.images(np.arange(9)).shape == (9, 12, 12, 3)


def test_a_flat_folder_of_images_is_one_class_keyed_by_file_name(tmp_path):
    gallery = tmp_path / "gallery"
    os.makedirs(gallery)
    for name in ("b.png", "a.png"):
        Image.new("RGB", (9, 7), (200, 10, 10)).save(gallery / name)
    dataset = load_dataset(folder_config(gallery, channels=3))
    assert dataset.keys == ["a.png", "b.png"]
    assert dataset.sources == [str(gallery / "a.png"), str(gallery / "b.png")]
    assert dataset.labels.tolist() == [0, 0] and dataset.class_names == ["gallery"]
    assert dataset.images([1])[0, 0, 0].tolist() == [200, 10, 10]


def test_images_decoded_lazily_are_decoded_once_and_only_when_read(tmp_path):
    for i in range(4):
        os.makedirs(tmp_path / f"c{i}")
        Image.new("L", (8, 8), 50 * i).save(tmp_path / f"c{i}" / "x.png")
    (tmp_path / "c3" / "x.png").write_bytes(b"broken")  # never read below
    dataset = load_dataset(folder_config(tmp_path), decode_now=False)
    reads = []
    read_one = dataset._read_one
    dataset._read_one = lambda i: reads.append(i) or read_one(i)
    assert dataset.images([1, 0, 1])[:, 0, 0, 0].tolist() == [50, 0, 50]
    assert dataset.images([0, 2])[:, 0, 0, 0].tolist() == [0, 100]
    assert sorted(reads) == [0, 1, 2]


def test_a_corrupt_image_is_reported_by_its_path(tmp_path):
    os.makedirs(tmp_path / "cats")
    Image.new("L", (8, 8)).save(tmp_path / "cats" / "good.png")
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(JaxRetrievalError, match=r"cannot read image .*broken\.png"):
        load_dataset(folder_config(tmp_path))


def test_folder_errors_say_what_to_do(tmp_path):
    with pytest.raises(JaxRetrievalError, match="not found"):
        load_dataset(folder_config(tmp_path / "missing"))
    with pytest.raises(JaxRetrievalError, match="no class sub-folders"):
        load_dataset(folder_config(tmp_path))
    os.makedirs(tmp_path / "empty_class")
    with pytest.raises(JaxRetrievalError, match="holds no image files"):
        load_dataset(folder_config(tmp_path))


def test_digits_are_written_as_tfds_and_read_back_in_sklearn_order(data_dir):
    from sklearn.datasets import load_digits

    dataset = load_dataset(tiny_config(data_dir, image_size=8))
    digits = load_digits()
    assert len(dataset) == 1797
    assert dataset.labels.tolist() == digits.target.tolist()
    expected = np.round(digits.images[:5] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(dataset.images(np.arange(5))[..., 0], expected)
    assert os.path.isfile(os.path.join(data_dir, "sklearn_digits", "1.0.0", "dataset_info.json"))
    again = read_source(dataset.sources[3], data_dir=str(data_dir))
    np.testing.assert_array_equal(np.asarray(again), expected[3])


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


def test_load_images_takes_paths_arrays_and_any_channel_count(tmp_path):
    Image.fromarray(np.full((10, 20, 3), 200, np.uint8)).save(tmp_path / "x.jpg")
    gray = np.zeros((5, 5), np.uint8)
    batch = load_images([str(tmp_path / "x.jpg"), gray, np.zeros((7, 7, 4), np.uint8)], 8, 1)
    assert batch.shape == (3, 8, 8, 1) and abs(int(batch[0].mean()) - 200) <= 2
    with pytest.raises(JaxRetrievalError, match="shape"):
        load_images([np.zeros((4, 4, 2), np.uint8)], 8, 1)
    with pytest.raises(JaxRetrievalError, match="not found"):
        load_images([str(tmp_path / "nope.png")], 8, 1)


def test_an_interrupted_directory_swap_is_undone_by_the_next_reader(tmp_path):
    from jaxretrieval.fileio import new_sibling_directory, recover_interrupted_swap, swap_in

    final = str(tmp_path / "index")
    first = new_sibling_directory(final)
    open(os.path.join(first, "v"), "w").write("1")
    swap_in(first, final)
    second = new_sibling_directory(final)
    open(os.path.join(second, "v"), "w").write("2")
    swap_in(second, final)
    assert open(os.path.join(final, "v")).read() == "2"
    assert os.listdir(tmp_path) == ["index"]  # no temporary or old copies left
    # A kill between the swap's two renames: the old copy sits aside, the final name is gone.
    os.rename(final, str(tmp_path / ".index.old-abc"))
    recover_interrupted_swap(final)
    assert open(os.path.join(final, "v")).read() == "2"


def test_class_balanced_batches_hold_p_classes_of_k_images():
    from jaxretrieval.data.splits import class_balanced_batch_rows

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
