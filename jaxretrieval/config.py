"""Run configuration: the defaults, loading a config file, overrides, validation.

A config is an `ml_collections.ConfigDict`. Config files in `configs/` define `get_config()`
and start from `base_config()`, so every key a run can read is listed here, with its default.
"""

import difflib
import hashlib
import importlib.util
import json
import os

import ml_collections

from jaxretrieval.data.input_pipeline import check_input_config
from jaxretrieval.data.sources import parse_reference
from jaxretrieval.data.splits import SPLITS
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.losses import DEFAULT_LOSS_OPTIONS, check_loss_options, get_loss
from jaxretrieval.models import backbone_options, check_backbone, check_input_norm
from jaxretrieval.models.pretrained import FORMATS

POOLINGS = ("flatten", "avg", "max", "gem")
PARALLEL_WRAPPERS = ("pmap", "shard_map")
SAMPLERS = ("random", "class_balanced")
DTYPES = ("float32", "bfloat16")
# The keys that decide the network's shape and its input: a checkpoint, an embedding export
# and an index belong together only when these agree.
MODEL_KEYS = ("image_size", "channels", "embedding_dim", "model")
# With the model keys, the keys that make a checkpoint this run's: another dataset, split or
# seed trains on other images (and often another number of classes).
# A video dataset's sampling decides which frames exist and in what order, so it is part of
# what a resumed run must share.
RUN_KEYS = MODEL_KEYS + ("dataset", "label_key", "split", "query_fraction", "seed", "loss",
                         "projection_head", "video_rate", "video_scene_threshold")


# A recipe that cannot run without pretrained weights sets init_from to this prefix and
# where such a file comes from; validation then asks for --config.init_from=PATH.
REQUIRED_INIT = "required: "


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with the offline default's values (digits, small seed CNN)."""
    c = ml_collections.ConfigDict()
    # Data.
    c.dataset = "digits"  # KIND or KIND:ARGUMENT, a kind of jaxretrieval.data.sources.DATASETS
    c.label_key = "label"  # the label feature of a TFDS dataset
    c.data_dir = ""  # TFDS data directory; "" means TFDS's own default
    # A tfds:NAME not yet prepared in data_dir: True downloads and prepares it (needs
    # internet); False stops at once, saying how to prepare it.
    c.download = False
    c.split = "held_out_images"  # a key of jaxretrieval.data.splits.SPLITS
    c.query_fraction = 0.2  # held_out_images: share of each class's images used as queries
    c.image_size = 32
    c.channels = 1
    c.cache_max_bytes = 1 << 30  # decoded images are kept in memory below this size
    # A video:PATH dataset's frames: this many per second (0: none), and with a scene-change
    # threshold in (0, 1) also each frame whose 16x16 grey miniature differs from the
    # previous frame's by more than it (mean absolute difference of [0, 1] pixels; 0: off).
    c.video_rate = 1.0
    c.video_scene_threshold = 0.0
    # How training batches are read (jaxretrieval.data.input_pipeline, docs/gpu.md):
    # in_process decodes in the training process, kept in memory below cache_max_bytes;
    # grain decodes ahead in worker processes (JPEGs with libjpeg-turbo) and prefetches to
    # the devices. Both read the same rows for each (seed, step).
    c.input_pipeline = "in_process"
    c.input_workers = -1  # grain's decoding processes: -1 one per host core but one, 0 none
    # grain: a JPEG is decoded at the smallest of 1/8, 1/4, 1/2, 1 scale still >= the input size
    c.input_reduced_dct = True
    # Faces. These two belong to the model's input convention, so they live under `model`
    # and enter the model hash: an index is only searched with the embedding it was built by.
    c.model = ml_collections.ConfigDict()
    # Each image (dataset items and queries alike) is cut to its face's aligned chip of side
    # image_size, found by dlib's detector and 5-point landmarks, before the model sees it;
    # an image with no face found is aligned as if the whole image were the face. Needs
    # channels=3 and the `[faces]` extra.
    c.model.align_faces = False
    # Test-time augmentation: an image's embedding is the L2-normalised mean of its own and
    # its mirror image's, at evaluation, export, search and in the service; never in training.
    c.model.flip_test = False

    # Model.
    c.model.name = "seed_cnn"  # a key of jaxretrieval.models.BACKBONES
    # Every backbone's own keys, with their defaults: BACKBONES[name].options.
    c.model.update(backbone_options())
    # The head:
    c.model.pooling = "gem"  # flatten | avg | max | gem
    c.model.hidden_dim = 0  # a Dense+ReLU before the projection (the seed: 128); 0 for none
    c.embedding_dim = 64
    # Compute dtype of convolutions and dense layers: float32 | bfloat16 (for GPUs and
    # TPUs). Parameters, BatchNorm statistics, pooling, the embedding and the loss stay
    # float32, so a checkpoint embeds in either dtype.
    c.dtype = "float32"
    # How pixels are normalised for the backbone (jaxretrieval.models.INPUT_NORMS): centred
    # (the package's own), dlib (dlib's face network), imagenet (torchvision and timm).
    c.model.input_norm = "centred"
    c.model.projection_bias = True  # False: the projection has no bias (dlib's 128-d layer)
    # How an image is fitted to image_size x image_size (data.images.InputSpec): 1 resizes
    # the whole image; below 1 resizes the shorter side to image_size / crop_fraction and
    # keeps the centre (ImageNet weights are evaluated at 0.875: 224 of 256).
    c.model.crop_fraction = 1.0

    # Augmentation, on device inside the train step; never applied at evaluation.
    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True
    c.augment.flip = False  # left-right; off for digits, where a flip changes the class
    c.augment.max_rotation_degrees = 10.0
    c.augment.max_translation = 0.1  # share of the image side
    c.augment.brightness = 0.1  # added to [0, 1] pixels, uniform in +-this
    c.augment.contrast = 0.1  # scale around the image mean, uniform in 1 +- this
    # Random resized crop (Inception-style): the crop's share of the image area, uniform in
    # this range, and its aspect ratio (width / height), log-uniform in that one; the crop
    # is then scaled to image_size. (1.0, 1.0): off. Fine-tuning on ImageNet: (0.08, 1.0).
    c.augment.crop_scale = (1.0, 1.0)
    c.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    # RGB only: blend with the grey image by a factor uniform in 1 +- saturation, and turn
    # the hue by up to +-hue of the colour circle (at most 0.5). 0: off.
    c.augment.saturation = 0.0
    c.augment.hue = 0.0

    # Optimisation.
    # Loss, by name (jaxretrieval.losses.LOSSES), or a sum such as "softmax+triplet". Pair
    # and triplet losses see the whole global batch, gathered across devices.
    c.loss = "normalized_softmax"
    # Width of an MLP head the loss is trained through and retrieval never uses (0: none).
    c.projection_head = 0
    # Each loss reads its own keys, declared with their defaults and ranges in
    # jaxretrieval.losses.LOSSES.
    c.loss_options = ml_collections.ConfigDict(DEFAULT_LOSS_OPTIONS)
    # Batches: `random` (shuffled epochs) or `class_balanced` (P classes x K images each,
    # P = global_batch_size / images_per_class).
    c.sampler = "random"
    c.images_per_class = 4
    c.global_batch_size = 64
    c.num_train_steps = 600
    c.learning_rate = 3e-3
    c.warmup_steps = 50
    c.weight_decay = 1e-4
    c.seed = 0
    # Start from a pretrained file (jaxretrieval.models.pretrained) instead of from scratch:
    # its format is found from the file (init_format forces one), it sets the config keys it
    # decides, and it loads what it holds; the rest starts fresh. A resumed run continues
    # from its own checkpoint instead.
    c.init_from = ""
    c.init_format = ""  # "" finds it; else a key of jaxretrieval.models.pretrained.FORMATS
    # Fine-tuning: the backbone learns at learning_rate x backbone_lr_multiplier (0: frozen),
    # and not at all for its first frozen_backbone_steps steps, while the head and the loss
    # learn.
    c.backbone_lr_multiplier = 1.0
    c.frozen_backbone_steps = 0
    # BatchNorm normalises with its running statistics and keeps them while training: for an
    # imported backbone and a small per-device batch.
    c.freeze_batch_norm = False
    # Weight decay reaches every parameter; False (the default) spares BatchNorm scales and
    # offsets, biases and GeM's exponent (every parameter of fewer than two dimensions).
    c.decay_norm_and_bias = False

    # Devices, logging, checkpoints.
    c.parallel = "pmap"  # pmap | shard_map
    c.log_every_steps = 20
    # Retrieval evaluation of the split while training, as the final one evaluates it: a
    # record in metrics.jsonl (and TensorBoard) each, drawn in loss.png (docs/workdir.md).
    c.eval_every_steps = 0  # every this many steps; 0: only the final evaluation
    c.tensorboard = False  # True: also write TensorBoard event files to DIR/tensorboard/
    c.checkpoint_every_steps = 200
    c.checkpoints_to_keep = 3
    c.embed_batch_size = 256
    # Matching: the similarity threshold calibrated on the split's queries for this precision.
    c.match_target_precision = 0.99
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the Python config file at `path`."""
    if not os.path.isfile(path):
        raise JaxRetrievalError(
            f"config file {path!r} not found: pass --config with the path of a file in configs/")
    spec = importlib.util.spec_from_file_location("_jaxretrieval_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise JaxRetrievalError(f"config file {path!r} defines no get_config()")
        return module.get_config()
    except JaxRetrievalError:
        raise
    except Exception as err:  # the file is user code: report where it failed
        raise JaxRetrievalError(
            f"config file {path!r} failed: {type(err).__name__}: {err}") from err


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
    """Sets `config.<dotted_key>` from a command-line string, parsed as the key's type."""
    *parents, leaf = dotted_key.split(".")
    node = config
    for name in parents:
        node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict):
            break
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise JaxRetrievalError(f"unknown config key {dotted_key!r}; "
                                f"{_nearest_keys_hint(dotted_key, flat_keys(config))}")
    current = node[leaf]
    try:
        node[leaf] = _parse_like(current, text)
    except (ValueError, TypeError) as err:
        raise JaxRetrievalError(
            f"--config.{dotted_key}={text!r}: expected {_type_phrase(current)} ({err})") from None


def _nearest_keys_hint(key: str, known) -> str:
    """"did you mean ...?" with the closest known keys, and where the full list is."""
    known = list(known)
    # Keys compare by their whole dotted name and by their last part, so a key given
    # without its section (`widths` for `model.widths`) is still found.
    by_leaf = {}
    for name in known:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=3,
                                          cutoff=0.6):
        close += [name for name in by_leaf[leaf] if name not in close]
    listing = "`jaxretrieval config` lists every key with its default and meaning"
    if not close:
        return listing
    return f"did you mean {' or '.join(repr(name) for name in close[:3])}? ({listing})"


def _type_phrase(value) -> str:
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "a comma-separated list", list: "a comma-separated list"}.get(type(value))
    if name is None:
        name = type(value).__name__
        name = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return name


def _parse_like(current, text: str):
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError("use true or false")
        return lowered in ("true", "1")
    if isinstance(current, (tuple, list)):
        items = [t for t in text.replace("(", "").replace(")", "").split(",") if t.strip()]
        element = current[0] if current else ""
        return tuple(_parse_like(element, t.strip()) for t in items)
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return text


def flat_keys(config, prefix=""):
    """Every leaf key of `config`, dotted (`model.widths`), in the config's order."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises JaxRetrievalError on the first value that cannot run, saying what to use."""
    def fail(message):
        raise JaxRetrievalError(f"bad config: {message}")

    if not config.dataset:
        fail("no dataset given; pass --config.dataset=folder:PATH (a folder with one "
             "sub-folder of images per class)")
    parse_reference(config.dataset)
    if config.split not in SPLITS:
        fail(f"split={config.split!r}; use one of {', '.join(SPLITS)}")
    if not 0.0 < config.query_fraction < 1.0:
        fail(f"query_fraction={config.query_fraction}; use a value between 0 and 1")
    if config.channels not in (1, 3):
        fail(f"channels={config.channels}; use 1 (grayscale) or 3 (RGB)")
    if not 0 < config.model.crop_fraction <= 1:
        fail(f"model.crop_fraction={config.model.crop_fraction}; use a share in (0, 1], 1 to "
             "resize the whole image")
    if config.model.align_faces and config.model.crop_fraction < 1:
        fail("model.align_faces cuts the face's own chip; leave model.crop_fraction at 1")
    if config.model.align_faces and config.channels != 3:
        fail(f"model.align_faces needs channels=3 (dlib's face chips are RGB); got "
             f"channels={config.channels}")
    check_input_config(config)
    if config.model.pooling not in POOLINGS:
        fail(f"model.pooling={config.model.pooling!r}; use one of {', '.join(POOLINGS)}")
    if config.dtype not in DTYPES:
        fail(f"dtype={config.dtype!r}; use one of {', '.join(DTYPES)}")
    if config.parallel not in PARALLEL_WRAPPERS:
        fail(f"parallel={config.parallel!r}; use one of {', '.join(PARALLEL_WRAPPERS)}")
    if isinstance(config.projection_head, bool) or not isinstance(
            config.projection_head, int) or config.projection_head < 0:
        fail(f"projection_head={config.projection_head!r}; use 0 (no head) or the head's "
             "hidden width, e.g. 256")
    get_loss(config.loss)  # an unknown loss name is refused, naming the known ones
    check_loss_options(config.loss_options)
    if config.sampler not in SAMPLERS:
        fail(f"sampler={config.sampler!r}; use one of {', '.join(SAMPLERS)}")
    if config.sampler == "class_balanced" and (
            config.images_per_class < 2 or config.global_batch_size % config.images_per_class):
        fail(f"sampler=class_balanced needs images_per_class >= 2 dividing global_batch_size "
             f"({config.images_per_class} and {config.global_batch_size} given)")
    if not 0.0 < config.match_target_precision <= 1.0:
        fail(f"match_target_precision={config.match_target_precision}; use a value in (0, 1]")
    check_backbone(config)
    check_input_norm(config)
    for name in ("image_size", "embedding_dim", "global_batch_size",
                 "log_every_steps", "checkpoint_every_steps", "checkpoints_to_keep",
                 "embed_batch_size"):
        if config[name] < 1:
            fail(f"{name}={config[name]}; use a positive integer")
    if isinstance(config.eval_every_steps, bool) or not isinstance(
            config.eval_every_steps, int) or config.eval_every_steps < 0:
        fail(f"eval_every_steps={config.eval_every_steps!r}; use 0 (evaluate only at the end) "
             "or a positive number of steps")
    if config.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        fail("tensorboard=True writes its event files with tensorboardX, which is not "
             "installed: `pip install tensorboardX`, or set --config.tensorboard=false")
    if config.num_train_steps < 0:
        fail(f"num_train_steps={config.num_train_steps}; use 0 (evaluate the initial model, "
             "e.g. a pretrained one) or a positive number of steps")
    if config.init_format and config.init_format not in FORMATS:
        fail(f"init_format={config.init_format!r}; use one of {', '.join(FORMATS)}, or leave "
             "it empty to find the format from the file")
    if config.init_from.startswith(REQUIRED_INIT):
        fail("this recipe starts from pretrained weights: pass --config.init_from=PATH with "
             + config.init_from[len(REQUIRED_INIT):])
    if config.init_format and not config.init_from:
        fail(f"init_format={config.init_format!r} without init_from; set "
             "--config.init_from=PATH, or leave init_format empty")
    if config.backbone_lr_multiplier < 0 or config.frozen_backbone_steps < 0:
        fail(f"backbone_lr_multiplier={config.backbone_lr_multiplier} and frozen_backbone_steps="
             f"{config.frozen_backbone_steps}; use values >= 0 (0: the backbone does not learn; "
             "no frozen steps)")
    if config.warmup_steps < 0 or config.learning_rate <= 0 or config.weight_decay < 0:
        fail("learning_rate must be positive, warmup_steps and weight_decay not negative")
    if config.model.hidden_dim < 0:
        fail(f"model.hidden_dim={config.model.hidden_dim}; use 0 (no hidden layer) or its width")
    a = config.augment
    if not (0 <= a.max_translation < 0.5 and 0 <= a.contrast < 1 and 0 <= a.brightness <= 1
            and 0 <= a.max_rotation_degrees <= 180):
        fail("augment: use 0 <= max_translation < 0.5, 0 <= contrast < 1, "
             "0 <= brightness <= 1 and 0 <= max_rotation_degrees <= 180")
    scale, ratio = tuple(a.crop_scale), tuple(a.crop_ratio)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        fail(f"augment.crop_scale={scale}; use (low, high) with 0 < low <= high <= 1, "
             "e.g. (0.08, 1.0), or (1.0, 1.0) for no crop")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        fail(f"augment.crop_ratio={ratio}; use (low, high) with 0 < low <= high, e.g. "
             "(0.75, 1.333)")
    if not (0 <= a.saturation <= 1 and 0 <= a.hue <= 0.5):
        fail(f"augment: saturation={a.saturation}, hue={a.hue}; use 0 <= saturation <= 1 "
             "and 0 <= hue <= 0.5")
    if (a.saturation or a.hue) and config.channels != 3:
        fail(f"augment.saturation and augment.hue change colours, and channels="
             f"{config.channels}; set them to 0 or use channels=3")


# `config.model` keys that came after workdirs already recorded model hashes, each with the
# value that means "as before". At that value a key stays out of the hash, so a checkpoint,
# export or index written before the key existed still belongs to its model.
NEUTRAL_MODEL_KEYS = {"input_norm": "centred", "projection_bias": True, "align_faces": False,
                      "flip_test": False, "crop_fraction": 1.0, "block_widths": ()}


def model_config_hash(config: ml_collections.ConfigDict, keys=MODEL_KEYS) -> str:
    """A short digest of the keys that decide the model (MODEL_KEYS), or of other `keys`."""
    subset = {key: config[key] for key in keys}
    if "model" in subset:
        subset["model"] = {key: value for key, value in subset["model"].items()
                           if key not in NEUTRAL_MODEL_KEYS or value != NEUTRAL_MODEL_KEYS[key]}
    text = json.dumps(ml_collections.ConfigDict(subset).to_dict(), sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    values = json.loads(text)
    config = base_config()
    config.update(_as_tuples(values, config))
    return config


def _as_tuples(values, reference):
    # JSON turns tuples into lists; restore them so the config compares and hashes as written.
    out = {}
    for key, value in values.items():
        ref = reference.get(key) if reference is not None else None
        if isinstance(value, dict):
            out[key] = _as_tuples(value, ref)
        elif isinstance(value, list):
            out[key] = tuple(value)
        else:
            out[key] = value
    return out


# A workdir keeps the config it was trained with in this file (Workdir.config_path).
CONFIG_FILE_NAME = "config.json"


def resolve_config(config_path: str | None, workdir: str | None,
                   overrides=()) -> ml_collections.ConfigDict:
    """A run's config: the file `config_path`, else the workdir's own config.json, else
    the built-in default; then `overrides`, (dotted key, text) pairs, applied and checked.

    This is the precedence of `python -m train --config FILE --config.KEY=VALUE`: a workdir
    resumes with what it was trained with unless told otherwise.
    """
    saved = os.path.join(workdir, CONFIG_FILE_NAME) if workdir else None
    if config_path:
        config = load_config_file(config_path)
    elif saved and os.path.isfile(saved):
        with open(saved) as f:
            config = config_from_json(f.read())
    else:
        config = base_config()
    for key, value in overrides:
        apply_override(config, key, value)
    validate_config(config)
    return config
