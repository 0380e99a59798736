"""The Embedder: a model's variables -> compiled, batched embedding of any images."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from jaxretrieval import parallel
from jaxretrieval.checkpoint import CheckpointStore
from jaxretrieval.config import config_to_json, model_config_hash
from jaxretrieval.embed import Embedder
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import build_model


def random_variables(config, seed=0):
    """Initial variables with every BatchNorm statistic moved off its identity value."""
    x = jnp.zeros((1, config.image_size, config.image_size, config.channels))
    variables = build_model(config).init(jax.random.key(seed), x)
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(lambda s: np.abs(rng.normal(size=s.shape)).astype(np.float32) + 0.5,
                         variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


@pytest.fixture(scope="module")
def config():
    return tiny_config("", embed_batch_size=8)


@pytest.fixture(scope="module")
def embedder(config):
    return Embedder(config, random_variables(config), checkpoint_step=3)


def random_images(count, config, seed=1):
    rng = np.random.default_rng(seed)
    shape = (count, config.image_size, config.image_size, config.channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def test_embeddings_are_unit_float32_rows_that_tell_images_apart(embedder, config):
    out = embedder.embed_uint8(random_images(5, config))
    assert out.shape == (5, config.embedding_dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert np.abs(out[0] - out[1]).max() > 1e-3
    assert embedder.checkpoint_step == 3
    assert embedder.model_config_hash == model_config_hash(config)


def test_an_images_embedding_does_not_depend_on_its_batch(embedder, config):
    # 19 images: more than embed_batch_size (8), so several batches, the last one padded.
    images = random_images(19, config)
    together = embedder.embed_uint8(images)
    one_by_one = np.concatenate([embedder.embed_uint8(images[i:i + 1]) for i in range(19)])
    in_threes = np.concatenate([embedder.embed_uint8(images[i:i + 3]) for i in range(0, 19, 3)])
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)
    np.testing.assert_allclose(in_threes, together, atol=1e-5)
    assert embedder.embed_uint8(images[:0]).shape == (0, config.embedding_dim)


def test_one_device_and_four_devices_embed_alike(embedder, config):
    assert len(embedder.devices) == 4
    on_one = Embedder(config, random_variables(config), checkpoint_step=3,
                      devices=parallel.local_devices()[:1])
    images = random_images(6, config)
    np.testing.assert_allclose(on_one.embed_uint8(images), embedder.embed_uint8(images),
                               atol=1e-5)


def test_images_of_other_sizes_colours_and_files_are_converted(embedder, config, tmp_path):
    # Flat images stay flat through any resize, and RGB (v, v, v) is grey v: each of these
    # is, once converted, the model's 16x16 grey input of value 90.
    expected = embedder.embed_uint8(np.full((1, 16, 16, 1), 90, np.uint8))
    Image.new("RGB", (30, 20), (90, 90, 90)).save(tmp_path / "flat.png")
    inputs = [np.full((40, 24), 90, np.uint8), np.full((16, 16, 3), 90, np.uint8),
              np.full((9, 9, 4), 90, np.uint8), str(tmp_path / "flat.png"),
              np.full((16, 16), 90.0)]
    out = embedder.embed(inputs)
    np.testing.assert_allclose(out, np.repeat(expected, len(inputs), axis=0), atol=1e-5)
    other = embedder.embed([np.full((16, 16), 30, np.uint8)])
    assert np.abs(other - expected).max() > 1e-3


def test_a_colour_model_takes_grey_images_as_equal_channels():
    config = tiny_config("", channels=3, embed_batch_size=4)
    embedder = Embedder(config, random_variables(config), checkpoint_step=0)
    grey = np.random.default_rng(0).integers(0, 256, (2, 16, 16), dtype=np.uint8)
    as_rgb = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_allclose(embedder.embed(list(grey)), embedder.embed_uint8(as_rgb),
                               atol=1e-5)


def test_embed_uint8_refuses_what_is_not_the_models_input(embedder, config):
    for images in (random_images(2, config).astype(np.float32),
                   np.zeros((2, 8, 8, 1), np.uint8), np.zeros((16, 16, 1), np.uint8)):
        with pytest.raises(JaxRetrievalError, match="this model takes uint8 .*Embedder.embed"):
            embedder.embed_uint8(images)


def test_from_workdir_embeds_with_the_saved_config_and_checkpoint(tmp_path, config):
    variables = random_variables(config, seed=4)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        f.write(config_to_json(config))
    with CheckpointStore(str(tmp_path / "checkpoints")) as store:
        for step, seed in ((5, 5), (6, 4)):
            saved = random_variables(config, seed=seed)
            store.save(step, {"params": {"model": saved["params"], "loss": {}},
                              "batch_stats": saved["batch_stats"]})
        store.wait()
    images = random_images(3, config)
    want = Embedder(config, variables, checkpoint_step=6).embed_uint8(images)
    loaded = Embedder.from_workdir(str(tmp_path))
    assert loaded.checkpoint_step == 6
    assert loaded.model_config_hash == model_config_hash(config)
    np.testing.assert_allclose(loaded.embed_uint8(images), want, atol=1e-6)
    older = Embedder.from_workdir(str(tmp_path), step=5)
    assert older.checkpoint_step == 5
    assert np.abs(older.embed_uint8(images) - want).max() > 1e-3
