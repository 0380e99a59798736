"""Image sources (folder, digits as TFDS) and reading images."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import YALEFACES, tiny_config
from jaxretrieval.config import base_config, validate_config
from jaxretrieval.data.images import InputSpec, load_images, to_model_input
from jaxretrieval.data.sources import load_dataset, read_source
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
    read_one = dataset.read_one
    dataset.read_one = lambda i: reads.append(i) or read_one(i)
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


def test_load_images_takes_paths_arrays_and_any_channel_count(tmp_path):
    Image.fromarray(np.full((10, 20, 3), 200, np.uint8)).save(tmp_path / "x.jpg")
    gray = np.zeros((5, 5), np.uint8)
    batch = load_images([str(tmp_path / "x.jpg"), gray, np.zeros((7, 7, 4), np.uint8)], InputSpec(8, 1))
    assert batch.shape == (3, 8, 8, 1) and abs(int(batch[0].mean()) - 200) <= 2
    with pytest.raises(JaxRetrievalError, match="shape"):
        load_images([np.zeros((4, 4, 2), np.uint8)], InputSpec(8, 1))
    with pytest.raises(JaxRetrievalError, match="not found"):
        load_images([str(tmp_path / "nope.png")], InputSpec(8, 1))


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


def test_a_centre_crop_keeps_the_middle_of_the_shorter_side_resized():
    # 40 x 20 (W x H), a left-to-right ramp: what a crop keeps shows in the values it spans.
    image = np.tile((np.arange(40) * 6).astype(np.uint8), (20, 1))
    whole = to_model_input(image, InputSpec(8, 1))[4, :, 0].astype(int)
    cropped = to_model_input(image, InputSpec(8, 1, crop_fraction=0.5))[4, :, 0].astype(int)
    # Whole: the full ramp squeezed into 8 columns. Cropped: the shorter side to 16 (width
    # 32), then the centre 8 columns, a quarter of the ramp around its middle (117).
    assert whole[0] < 20 and whole[-1] > 210
    assert 80 < cropped[0] < cropped[-1] < 160
    assert abs((cropped[0] + cropped[-1]) / 2 - 117) < 10
    with pytest.raises(JaxRetrievalError, match="crop_fraction"):
        config = base_config()
        config.model.crop_fraction = 1.5
        validate_config(config)


def test_a_tfds_dataset_not_prepared_fails_at_once_saying_how_to_prepare_it(tmp_path):
    config = tiny_config(tmp_path / "tfds", dataset="tfds:mnist")
    with pytest.raises(JaxRetrievalError) as err:
        load_dataset(config)  # no download is tried, so no network is needed
    message = str(err.value)
    assert "'mnist' is not prepared in" in message
    assert f"tfds build mnist --data_dir {tmp_path / 'tfds'}" in message
    assert "--config.download=true" in message and "--config.data_dir" in message
    assert not os.path.exists(tmp_path / "tfds" / "downloads")


def test_tfds_sources_are_read_from_many_threads_at_once_through_one_opened_source(
        data_dir, monkeypatch):
    """A service's first thumbnail requests arrive together: each reads its image, and the
    split is opened once, not once per read."""
    import concurrent.futures

    import tensorflow_datasets as tfds

    from jaxretrieval.data import sources

    dataset = load_dataset(tiny_config(data_dir, image_size=8))
    opened = []
    real = tfds.data_source
    monkeypatch.setattr(tfds, "data_source",
                        lambda *a, **kw: opened.append(a) or real(*a, **kw))
    sources.tfds_data_source.cache_clear()
    rows = list(range(0, 1797, 97))
    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
        images = list(pool.map(lambda row: read_source(dataset.sources[row], str(data_dir)),
                               rows, timeout=120))
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in images]),
                                  dataset.images(np.asarray(rows))[..., 0])
    assert len(opened) == 1
