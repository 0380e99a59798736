"""Starting from a pretrained file: `--config.init_from=PATH`.

`FORMATS` maps a format's name to a `PretrainedFormat`: how to recognise one of its files
from the first bytes, which config keys a file decides (the model it holds, its input size
and preprocessing), and how to load it into the variables of `RetrievalModel`. A run that
starts from a file goes through three steps, which `jaxretrieval.training` takes:

    find_format(path, init_format)       the format's name, found from the file or forced
    configured_for_init(config)          the config with the file's keys set, each change logged
    initial_variables(config, variables) fresh variables with the file's values put in

What a file holds replaces the fresh values leaf by leaf, each of the same shape; what it
lacks (a projection a backbone-only file does not have, a loss's proxies) keeps its fresh
initialisation. Adding a format is one entry in `FORMATS`.
"""

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import torch_import
from jaxretrieval.models.dlib_format import Stream, read_dlib_network
from jaxretrieval.models.face_resnet import EMBEDDING_DIM as DLIB_EMBEDDING_DIM
from jaxretrieval.models.face_resnet import INPUT_SIZE as DLIB_INPUT_SIZE
from jaxretrieval.models.face_resnet import variables_from_dlib

logger = logging.getLogger(__name__)

# Enough of a file for every format to recognise it.
SNIFF_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class PretrainedFormat:
    """A kind of pretrained file: how to recognise it, what it decides, how to load it."""

    # path -> True if the file is in this format (reads only its first bytes).
    sniff: Callable[[str], bool]
    # path -> {"dotted.config.key": value} that the file decides.
    decided_keys: Callable[[str], dict]
    # (path, config) -> {"params": {...}, "batch_stats": {...}}: subtrees of RetrievalModel's
    # variables; what the file lacks is absent and starts fresh.
    load: Callable[[str, Any], dict]


def read_head(path: str, size: int = SNIFF_BYTES) -> bytes:
    """The first `size` bytes of the file at `path`."""
    with open(path, "rb") as f:
        return f.read(size)


# ---------------------------------------------------------------- dlib

def sniff_dlib(path: str) -> bool:
    """A network saved by dlib's serialize() starts with its loss layer: version 1, then a
    record name such as "loss_metric_2"."""
    stream = Stream(read_head(path, 64), path)
    try:
        if stream.signed("the loss layer's version") != 1:
            return False
        return stream.string("the loss layer's record").startswith("loss_")
    except JaxRetrievalError:
        return False


def dlib_decided_keys(path: str) -> dict:
    del path  # the only dlib network read is the face ResNet: check_plan refuses others
    return {"image_size": DLIB_INPUT_SIZE, "channels": 3, "model.name": "dlib_face_resnet",
            "model.pooling": "avg", "model.hidden_dim": 0,
            "embedding_dim": DLIB_EMBEDDING_DIM, "model.input_norm": "dlib",
            "model.projection_bias": False, "model.align_faces": True}


def load_dlib(path: str, config) -> dict:
    """The trunk and the 128-d layer (the retrieval projection, without bias)."""
    del config
    backbone, head_kernel = variables_from_dlib(read_dlib_network(path))
    return {"params": {"backbone": backbone, "projection": {"kernel": head_kernel}},
            "batch_stats": {}}


FORMATS = {
    # dlib's face descriptor network, dlib_face_recognition_resnet_model_v1.dat of the
    # face-recognition-models package (jaxretrieval.data.faces.face_model_file finds it).
    "dlib": PretrainedFormat(sniff=sniff_dlib, decided_keys=dlib_decided_keys, load=load_dlib),
    # ResNet state_dicts as torchvision saves them (torch.save or safetensors); timm's plain
    # resnet* files use the same names. "timm" claims only timm's own variants.
    "torchvision": PretrainedFormat(sniff=torch_import.sniff_torchvision,
                                    decided_keys=torch_import.decided_keys,
                                    load=torch_import.load),
    "timm": PretrainedFormat(sniff=torch_import.sniff_timm,
                             decided_keys=torch_import.decided_keys, load=torch_import.load),
}


# ---------------------------------------------------------------- the steps

def find_format(path: str, init_format: str = "") -> str:
    """The name of the format of the file at `path` (a key of FORMATS): `init_format` when
    given, else the one format whose sniff claims the file."""
    known = ", ".join(FORMATS)
    if init_format and init_format not in FORMATS:
        raise JaxRetrievalError(
            f"init_format={init_format!r} is not a known format; use one of {known}, or leave "
            "it empty to find the format from the file")
    if not os.path.isfile(path):
        raise JaxRetrievalError(
            f"init_from={path!r}: no such file; give the path of a pretrained file (formats: "
            f"{known}), or leave init_from empty to train from scratch")
    if init_format:
        return init_format
    try:
        claims = [name for name, fmt in FORMATS.items() if fmt.sniff(path)]
    except OSError as err:
        raise JaxRetrievalError(f"init_from={path!r}: cannot read it ({err.strerror})") from None
    if not claims:
        raise JaxRetrievalError(
            f"init_from={path!r} is in no format this package reads (known formats: {known}); "
            "check the path, or give the format with --config.init_format if the file is one "
            "of them under another layout")
    if len(claims) > 1:
        raise JaxRetrievalError(
            f"init_from={path!r} could be any of the formats {', '.join(claims)}; choose one "
            f"with --config.init_format={claims[0]} (or another of them)")
    return claims[0]


def get_dotted(config, key: str):
    node = config
    for name in key.split("."):
        node = node[name]
    return node


def set_dotted(config, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value


def configured_for_init(config):
    """`config` with the keys that `config.init_from`'s file decides set, each change logged
    at INFO; `config` itself when init_from is empty. The input config is not changed."""
    if not config.init_from:
        return config
    path = os.path.expanduser(config.init_from)
    name = find_format(path, config.init_format)
    decided = FORMATS[name].decided_keys(path)
    configured = config.copy_and_resolve_references()
    for key, value in decided.items():
        try:
            current = get_dotted(configured, key)
        except (KeyError, AttributeError):
            raise JaxRetrievalError(
                f"the {name} format decides config key {key!r}, which this config lacks; "
                "start from jaxretrieval.config.base_config()") from None
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)  # a format may read its keys from JSON
        if current != value:
            # A value the user gave on purpose is overridden too: the file cannot be read
            # into another shape of network.
            set_dotted(configured, key, value)
            logger.info("init_from sets %s: %s -> %s", key, format_value(current),
                        format_value(value))
    logger.info("init_from: %s is a %s file", path, name)
    return configured


def format_value(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def initial_variables(config, variables: dict) -> dict:
    """`variables` (RetrievalModel's fresh {"params", "batch_stats"}) with the values of
    `config.init_from`'s file put in; what the file lacks keeps its fresh value.

    Every value the file holds must have a fresh leaf at the same path, of the same shape;
    it takes that leaf's dtype. The input trees are not changed.
    """
    path = os.path.expanduser(config.init_from)
    name = find_format(path, config.init_format)
    loaded = FORMATS[name].load(path, config)
    merged = jax.tree.map(lambda leaf: leaf, dict(variables))  # a copy of the containers
    count = 0
    for collection, tree in loaded.items():
        for key_path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [collection] + [str(getattr(k, "key", k)) for k in key_path]
            fresh = lookup(merged, names)
            where = "/".join(names)
            if fresh is None:
                raise JaxRetrievalError(
                    f"init_from={path!r} ({name}) holds {where}, which model.name="
                    f"{config.model.name} does not have; the file belongs to another "
                    f"architecture: use --config.init_from with a file of this model, or let "
                    f"the file set the model (it does unless the config was changed after)")
            value = np.asarray(value)
            if value.shape != np.shape(fresh):
                raise JaxRetrievalError(
                    f"init_from={path!r} ({name}) does not fit the model: {where} has shape "
                    f"{value.shape} in the file, the model expects {tuple(np.shape(fresh))}; "
                    "use a file of this architecture, or the config keys the file decides "
                    "(image_size, channels, model.*, embedding_dim)")
            store(merged, names, value.astype(np.asarray(fresh).dtype))
            count += 1
    total = len(jax.tree.leaves(variables))
    logger.info("init_from: loaded %d of the model's %d arrays from %s; the rest start fresh",
                count, total, path)
    return merged


def lookup(tree, names):
    """The leaf at `names` in nested dicts, or None if the path is not there or not a leaf."""
    node = tree
    for name in names:
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    return None if isinstance(node, dict) else node


def store(tree, names, value) -> None:
    for name in names[:-1]:
        tree = tree[name]
    tree[names[-1]] = value
