"""The grain input pipeline reads the in-process loader's batches for every (seed, step)."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from jaxretrieval import parallel
from jaxretrieval.config import base_config, validate_config
from jaxretrieval.data.input_pipeline import TrainingBatches, grain_host_batches
from jaxretrieval.data.sources import load_dataset
from jaxretrieval.data.splits import batch_plan, split_dataset
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.workdir import Workdir

# The decoder's rounding, in uint8 levels. At full DCT scale simplejpeg's pixels are
# Pillow's (both run libjpeg-turbo's accurate integer DCT): no difference at all. A JPEG
# decoded at a reduced DCT scale and then resized differs from the full decode resized by
# Pillow by the scaled DCT's averaging, which is not Pillow's filter: on these pictures (at
# 1/2 to 1/8 scale) 17 levels at most in a pixel, 0.75 on average; asserted with a margin.
REDUCED_DCT_MAX_LEVELS = 20
REDUCED_DCT_MEAN_LEVELS = 1.25
SIZE = 24
STEPS = 4


def photo(rng, width, height, shift):
    """A smooth colour picture with a little noise, like a photo's content."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 0.5 + 40 * np.sin(y / 17 + shift), y * 0.6 + 30 * np.cos(x / 23),
                      (x + y) * 0.3 + 20 * shift], -1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """4 classes of JPEGs from 30 to 400 pixels a side (the large ones decode at 1/2 .. 1/8
    scale), with a greyscale JPEG, a PNG and a JPEG turned by its EXIF orientation."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for label in range(4):
        os.makedirs(root / f"class{label}")
        for i in range(5):
            width, height = (int(v) for v in rng.integers(30, 400, 2))
            photo(rng, width, height, label).save(root / f"class{label}" / f"{i}.jpg",
                                                  quality=90)
    photo(rng, 200, 120, 1).convert("L").save(root / "class0" / "grey.jpg", quality=90)
    photo(rng, 90, 70, 2).save(root / "class1" / "lossless.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise
    photo(rng, 300, 100, 3).save(root / "class2" / "turned.jpg", quality=90, exif=exif)
    return root


def folder_config(root, **overrides):
    config = base_config()
    config.dataset = f"folder:{root}"
    config.image_size, config.channels = SIZE, 3
    config.global_batch_size, config.sampler, config.images_per_class = 8, "class_balanced", 2
    config.input_workers = 0
    config.update(overrides)
    return config


def loaded(config):
    dataset = load_dataset(config)
    return dataset, batch_plan(config, split_dataset(config, dataset), dataset.labels)


def host_arrays(device_batch):
    """A sharded batch [devices, per device, ...] back on the host as [batch, ...]."""
    return {k: np.asarray(v).reshape((-1,) + v.shape[2:]) for k, v in device_batch.items()}


def in_process_batches(config, dataset, plan, start, stop):
    batches = TrainingBatches(config, dataset, plan, slice(None), start, stop,
                              parallel.global_devices())
    return [host_arrays(next(batches)) for _ in range(start, stop)]


def levels(a, b):
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_grain_workers_read_the_in_process_loaders_batches_up_to_the_dct_rounding(
        photo_folder):
    config = folder_config(photo_folder)
    dataset, plan = loaded(config)
    expected = in_process_batches(config, dataset, plan, 0, STEPS)
    batches = iter(grain_host_batches(config, dataset, plan, slice(None), 0, STEPS, workers=1))
    try:
        got = list(batches)
    finally:
        batches.close()
    assert len(got) == STEPS
    differences = []
    for want, batch in zip(expected, got):
        np.testing.assert_array_equal(batch["labels"], want["labels"])
        assert batch["images"].shape == want["images"].shape == (8, SIZE, SIZE, 3)
        differences.append(levels(batch["images"], want["images"]))
    differences = np.stack(differences)
    assert differences.max() <= REDUCED_DCT_MAX_LEVELS
    assert differences.mean() <= REDUCED_DCT_MEAN_LEVELS
    assert differences.max() > 0  # the large JPEGs did take the reduced scale

    # At full DCT scale the pixels are the in-process loader's, to the level.
    config.input_reduced_dct = False
    full = grain_host_batches(config, dataset, plan, slice(None), 0, STEPS, workers=0)
    for want, batch in zip(expected, full):
        np.testing.assert_array_equal(batch["images"], want["images"])


def test_a_resumed_run_reads_the_same_batches_from_its_step_on_the_devices(photo_folder):
    config = folder_config(photo_folder, input_pipeline="grain")
    dataset, plan = loaded(config)
    devices = parallel.global_devices()
    whole = TrainingBatches(config, dataset, plan, slice(None), 0, STEPS, devices)
    resumed = TrainingBatches(config, dataset, plan, slice(None), 2, STEPS, devices)
    try:
        first = [host_arrays(b) for b in whole]
        later = [host_arrays(b) for b in resumed]
    finally:
        whole.close()
        resumed.close()
    assert len(first) == STEPS and len(later) == STEPS - 2
    for a, b in zip(first[2:], later):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    # Different steps are different batches (the comparison above can fail).
    assert not np.array_equal(first[0]["labels"], first[1]["labels"])


def test_a_corrupt_image_stops_the_workers_with_one_clear_error(photo_folder, tmp_path):
    root = tmp_path / "photos"
    os.makedirs(root / "a")
    os.makedirs(root / "b")
    for i in range(3):
        (root / "a" / f"{i}.jpg").write_bytes((photo_folder / "class0" / f"{i}.jpg").read_bytes())
    broken = root / "b" / "9.jpg"  # a class's lone image is always a training image
    broken.write_bytes((photo_folder / "class0" / "0.jpg").read_bytes()[:400])
    # Nothing decoded up front (as for a dataset larger than the cache): the workers meet it.
    config = folder_config(root, sampler="random", cache_max_bytes=0)
    dataset, plan = loaded(config)
    batches = iter(grain_host_batches(config, dataset, plan, slice(None), 0, 2, workers=1))
    try:
        with pytest.raises(JaxRetrievalError) as error:
            list(batches)
    finally:
        batches.close()
    message = str(error.value)
    assert str(broken) in message and "replace or remove the file" in message


def test_tfds_records_decode_to_the_in_process_loaders_pixels(data_dir):
    config = tiny_config(data_dir, input_pipeline="grain", input_workers=0)
    dataset, plan = loaded(config)
    expected = in_process_batches(config, dataset, plan, 5, 7)
    got = list(grain_host_batches(config, dataset, plan, slice(None), 5, 7))
    for want, batch in zip(expected, got):
        np.testing.assert_array_equal(batch["images"], want["images"])
        np.testing.assert_array_equal(batch["labels"], want["labels"])


def test_training_from_the_grain_pipeline_follows_the_in_process_run(data_dir, tmp_path,
                                                                    trained_workdir):
    from jaxretrieval.training import train

    workdir = tmp_path / "grain"
    train(tiny_config(data_dir, input_pipeline="grain", input_workers=0), str(workdir))
    losses = lambda path: [(r["step"], r["loss"]) for r in Workdir(str(path)).read_train_log()
                           if r.get("kind") == "train"]
    reference = losses(trained_workdir[0])
    assert losses(workdir) == reference and len(reference) == 4


@pytest.mark.parametrize("key, value, words", [
    ("input_pipeline", "tf.data", "use one of in_process, grain"),
    ("input_workers", -2, "-1 (one per host core)"),
])
def test_bad_input_settings_are_refused_saying_what_to_use(key, value, words):
    config = base_config()
    config[key] = value
    with pytest.raises(JaxRetrievalError, match="bad config") as error:
        validate_config(config)
    assert words in str(error.value)


def test_face_alignment_stays_with_the_in_process_pipeline():
    config = base_config()
    config.input_pipeline, config.channels, config.model.align_faces = "grain", 3, True
    with pytest.raises(JaxRetrievalError, match="use input_pipeline=in_process"):
        validate_config(config)


def test_video_datasets_stay_with_the_in_process_pipeline():
    config = base_config()
    config.input_pipeline, config.dataset = "grain", "video:/data/videos"
    with pytest.raises(JaxRetrievalError, match="video:PATH.*use input_pipeline=in_process"):
        validate_config(config)
