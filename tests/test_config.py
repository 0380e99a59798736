"""Config files, command-line overrides and validation."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from jaxretrieval import models
from jaxretrieval.config import (REQUIRED_INIT, apply_override, base_config, config_from_json,
                                 config_to_json, load_config_file, model_config_hash,
                                 validate_config)
from jaxretrieval.data import sources
from jaxretrieval.errors import JaxRetrievalError


def test_every_config_file_loads_and_validates():
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.endswith(".py"):
            try:
                config = load_config_file(os.path.join(REPO, "configs", name))
            except JaxRetrievalError as err:
                # A recipe on an optional extra's model says how to install it.
                if "pip install" in str(err) and not os.environ.get("JAXRETRIEVAL_REQUIRE_FACES"):
                    continue
                raise
            if not config.dataset:  # a recipe for the user's own data asks for it
                with pytest.raises(JaxRetrievalError, match="--config.dataset=folder:PATH"):
                    validate_config(config)
                config.dataset = "folder:/any/faces"
            if config.init_from.startswith(REQUIRED_INIT):  # so does one that needs weights
                with pytest.raises(JaxRetrievalError, match="--config.init_from=PATH with"):
                    validate_config(config)
                config.init_from = "/any/resnet50.pth"
            validate_config(config)
            assert "python -m train" in open(os.path.join(REPO, "configs", name)).read()


def test_seed_cnn_config_is_the_seed_model():
    config = load_config_file(os.path.join(REPO, "configs", "seed_cnn.py"))
    assert (config.image_size, config.channels) == (224, 3)
    assert tuple(config.model.widths) == (32, 64, 128) and config.model.padding == "VALID"
    assert config.model.pooling == "flatten" and config.embedding_dim == 128


def test_overrides_are_parsed_as_the_key_type():
    config = base_config()
    apply_override(config, "num_train_steps", "7")
    apply_override(config, "learning_rate", "1e-4")
    apply_override(config, "model.batch_norm", "false")
    apply_override(config, "model.widths", "16,32")
    apply_override(config, "dataset", "folder:/data/faces")
    assert config.num_train_steps == 7 and config.learning_rate == 1e-4
    assert config.model.batch_norm is False and tuple(config.model.widths) == (16, 32)
    assert config.dataset == "folder:/data/faces"


def test_bad_overrides_name_the_key_and_the_fix():
    config = base_config()
    with pytest.raises(JaxRetrievalError, match="unknown config key 'num_steps'"):
        apply_override(config, "num_steps", "3")
    with pytest.raises(JaxRetrievalError, match="expected an integer"):
        apply_override(config, "num_train_steps", "many")
    with pytest.raises(JaxRetrievalError, match="did you mean 'num_train_steps'"):
        apply_override(config, "num_steps", "3")
    # A key given without its section is found by its last part.
    with pytest.raises(JaxRetrievalError, match="did you mean 'model.widths'"):
        apply_override(config, "widths", "8,16")
    with pytest.raises(JaxRetrievalError, match="expected a number"):
        apply_override(config, "learning_rate", "fast")
    with pytest.raises(JaxRetrievalError, match="true or false"):
        apply_override(config, "model.batch_norm", "maybe")


@pytest.mark.parametrize("key, value, message", [
    ("split", "random", "use one of held_out_images, unseen_classes, dataset_splits"),
    ("dataset", "imagenet", "use digits, tfds:NAME, folder:PATH or video:PATH"),
    ("dataset", "digits:mnist", "use digits, tfds:NAME, folder:PATH or video:PATH"),
    ("dataset", "tfds:", "use digits, tfds:NAME, folder:PATH or video:PATH"),
    ("channels", 2, "use 1 .* or 3"),
    ("parallel", "vmap", "use one of pmap, shard_map"),
    ("dtype", "float16", "use one of float32, bfloat16"),
    ("global_batch_size", 0, "positive integer"),
    ("query_fraction", 1.5, "between 0 and 1"),
    ("image_size", 4, "too small"),
    ("projection_head", -1, "use 0 .no head. or the head's hidden width"),
])
def test_validation_refuses_values_that_cannot_run(key, value, message):
    config = base_config()
    config[key] = value
    with pytest.raises(JaxRetrievalError, match=message):
        validate_config(config)


def test_json_round_trip_keeps_the_model_hash():
    config = base_config()
    config.model.widths = (8, 16)
    again = config_from_json(config_to_json(config))
    assert model_config_hash(again) == model_config_hash(config)
    assert tuple(again.model.widths) == (8, 16)
    again.embedding_dim = 32
    assert model_config_hash(again) != model_config_hash(config)


def test_model_keys_added_later_keep_the_hash_of_earlier_workdirs():
    # What model_config_hash gave for these configs before model.input_norm, projection_bias,
    # align_faces and flip_test existed: indexes and exports written then record it.
    seed_cnn = load_config_file(os.path.join(REPO, "configs", "seed_cnn.py"))
    assert model_config_hash(base_config()) == "92a3972f6eafd773"
    assert model_config_hash(seed_cnn) == "08c7f218d6e23a8a"
    for key, value in (("input_norm", "imagenet"), ("projection_bias", False),
                       ("align_faces", True), ("flip_test", True)):
        changed = base_config()
        changed.model[key] = value
        assert model_config_hash(changed) != "92a3972f6eafd773", key


@pytest.mark.parametrize("key, value, message", [
    ("name", "vgg16",
     "model.name='vgg16'; use one of dlib_face_resnet, resnet101, resnet152, resnet18, "
     "resnet34, resnet50, seed_cnn"),
    ("padding", "FULL", "model.padding='FULL'; use SAME or VALID"),
    ("widths", (), "at least one positive width"),
    ("hidden_dim", -1, "model.hidden_dim=-1"),
])
def test_validation_refuses_model_values_that_cannot_run(key, value, message):
    config = base_config()
    config.model[key] = value
    with pytest.raises(JaxRetrievalError, match=message):
        validate_config(config)


def test_a_backbones_checks_apply_only_when_it_is_the_model():
    config = base_config()
    config.model.num_filters = 0  # a resnet key: no concern of the seed CNN
    validate_config(config)
    config.model.name = "resnet18"
    with pytest.raises(JaxRetrievalError, match="model.num_filters=0; use a positive integer"):
        validate_config(config)


def test_a_loss_option_a_config_file_misspells_is_refused_naming_the_options():
    config = base_config()
    config.loss_options.arcface_margn = 0.3
    with pytest.raises(JaxRetrievalError, match="arcface_margn is no loss option; use one of "
                                                ".*arcface_margin"):
        validate_config(config)


class OneByOne(nn.Module):
    """A backbone for the registry test: one 1x1 convolution."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(self.features, (1, 1), dtype=self.dtype)(x)


def test_a_registered_backbone_is_configured_validated_and_built(monkeypatch):
    backbone = models.Backbone(
        build=lambda m, bn_axis_name, dtype: OneByOne(m.features, dtype),
        options={"features": 4},
        check=lambda config: None if config.model.features > 0 else "model.features < 1")
    monkeypatch.setitem(models.BACKBONES, "one_by_one", backbone)
    config = base_config()
    assert config.model.features == 4 and config.model.widths == (32, 64, 128)
    apply_override(config, "model.name", "one_by_one")
    apply_override(config, "model.features", "6")
    validate_config(config)

    model = models.build_model(config)
    x = jnp.zeros((2, config.image_size, config.image_size, config.channels))
    variables = model.init(jax.random.key(0), x)
    assert variables["params"]["backbone"]["Conv_0"]["kernel"].shape == (1, 1, 1, 6)
    out = model.apply(variables, x + 0.3)
    assert out.shape == (2, config.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)

    config.model.features = 0
    with pytest.raises(JaxRetrievalError, match="bad config: model.features < 1"):
        validate_config(config)


def test_backbones_that_share_a_key_must_share_its_default(monkeypatch):
    clash = models.Backbone(build=None, options={"num_filters": 32})
    monkeypatch.setitem(models.BACKBONES, "narrow_resnet", clash)
    with pytest.raises(ValueError, match="'narrow_resnet' gives model.num_filters another"):
        base_config()


def test_a_registered_kind_of_dataset_is_validated_and_loaded(monkeypatch):
    def load_noise(seed, config):
        rng = np.random.default_rng(int(seed))
        size, channels = config.image_size, config.channels
        images = rng.integers(0, 256, (6, size, size, channels), dtype=np.uint8)
        return sources.ImageDataset(
            f"noise:{seed}", np.array([0, 0, 0, 1, 1, 1]), [str(i) for i in range(6)],
            [""] * 6, ["a", "b"], size, channels, lambda i: images[i])

    monkeypatch.setitem(sources.DATASETS, "noise", sources.DatasetSource(load_noise, "SEED"))
    config = base_config()
    config.dataset = "noise:7"
    validate_config(config)
    dataset = sources.load_dataset(config)
    assert (dataset.name, len(dataset), dataset.num_classes) == ("noise:7", 6, 2)
    expected = np.random.default_rng(7).integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
    np.testing.assert_array_equal(dataset.images([4, 1]), expected[[4, 1]])

    config.dataset = "noise"
    with pytest.raises(JaxRetrievalError,
                       match="use digits, tfds:NAME, folder:PATH, video:PATH or noise:SEED"):
        validate_config(config)
