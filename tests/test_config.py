"""Config files, command-line overrides and validation."""

import os

import pytest

from conftest import REPO
from jaxretrieval.config import (apply_override, base_config, config_from_json, config_to_json,
                                 load_config_file, model_config_hash, validate_config)
from jaxretrieval.errors import JaxRetrievalError


def test_every_config_file_loads_and_validates():
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.endswith(".py"):
            config = load_config_file(os.path.join(REPO, "configs", name))
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
    with pytest.raises(JaxRetrievalError, match="expected a int"):
        apply_override(config, "num_train_steps", "many")
    with pytest.raises(JaxRetrievalError, match="true or false"):
        apply_override(config, "model.batch_norm", "maybe")


@pytest.mark.parametrize("key, value, message", [
    ("split", "random", "use one of held_out_images, unseen_classes, dataset_splits"),
    ("dataset", "imagenet", "use digits, tfds:NAME or folder:PATH"),
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
