"""Models: backbones found by name, and the retrieval model that wraps one.

`BACKBONES` maps a name to a `Backbone`: its builder, the `config.model` keys it reads with
their defaults, and their check. The config takes its model keys and their validation from
there, so adding a backbone touches this package alone.

`RetrievalModel(x, train)` maps float32 images in [0, 1] to L2-normalised embeddings
[B, embedding_dim]: it normalises the pixels as `config.model.input_norm` names
(`INPUT_NORMS`: the convention the backbone's weights were trained with), runs the backbone,
pools, and projects. Anything a loss learns besides the model (classifier weights, proxies)
belongs to the loss (`jaxretrieval.losses`), not to the model.

Explanations (`jaxretrieval.explain`) see inside it through public hooks:
`embed_with_feature_map` returns the backbone's feature map beside the embedding; a
`position_weights` variable in the `explain` collection, when given, weights each spatial
position of that feature map before pooling; and `stage_features` returns the feature map of
each stage inside the backbone, where weights in the same collection act alike
(`models.stages`).
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models.cnn import SeedCNN
from jaxretrieval.models.face_resnet import INPUT_SIZE as DLIB_INPUT_SIZE
from jaxretrieval.models.face_resnet import DlibFaceResNet, preprocess_dlib
from jaxretrieval.models.heads import GeM, l2_normalize, pool_features
from jaxretrieval.models.resnet import RESNET_DEPTHS, resnet
from jaxretrieval.models.stages import EXPLAIN_COLLECTION, STAGE_COLLECTION, stage_number


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A backbone by name: the `config.model` keys it reads, their check, and its builder."""

    # (config.model, BatchNorm axis name, compute dtype) -> a module returning a feature map.
    build: Callable
    # The `config.model` keys `build` reads, with their defaults. Every config holds every
    # backbone's keys, so two backbones that share a key share its default.
    options: dict
    # (config) -> what stops this backbone from running with it, or None.
    check: Callable = lambda config: None


def _seed_cnn(m, bn_axis_name, dtype):
    return SeedCNN(widths=tuple(m.widths), kernel_size=m.kernel_size, padding=m.padding,
                   batch_norm=m.batch_norm, bn_axis_name=bn_axis_name, dtype=dtype)


def _check_seed_cnn(config):
    m = config.model
    if m.padding not in ("SAME", "VALID"):
        return f"model.padding={m.padding!r}; use SAME or VALID"
    if not m.widths or min(m.widths) < 1 or m.kernel_size < 1:
        return "model.widths needs at least one positive width and model.kernel_size >= 1"
    # The stack must leave at least one pixel: each stage is a conv (VALID loses k-1) then a
    # 2x pool.
    side = config.image_size
    for _ in m.widths:
        if m.padding == "VALID":
            side -= m.kernel_size - 1
        side //= 2
    if side < 1:
        return (f"image_size={config.image_size} is too small for {len(m.widths)} conv/pool "
                "stages; raise image_size or remove a width from model.widths")
    return None


SEED_CNN_OPTIONS = {
    "widths": (32, 64, 128),  # one conv/pool stage per width
    "kernel_size": 3,
    "padding": "SAME",  # the seed uses VALID
    "batch_norm": True,
}


def _resnet(name):
    return lambda m, bn_axis_name, dtype: resnet(
        name, num_filters=m.num_filters, small_stem=m.small_stem,
        block_widths=tuple(int(w) for w in m.block_widths), bn_axis_name=bn_axis_name, dtype=dtype)


def _check_resnet(config):
    m = config.model
    if m.num_filters < 1:
        return f"model.num_filters={m.num_filters}; use a positive integer"
    blocks = sum(RESNET_DEPTHS[m.name][0])
    try:  # from the command line, a width is text until checked here
        widths = [int(w) for w in m.block_widths]
    except ValueError:
        widths = [0]
    if widths and (len(widths) != blocks or min(widths) < 1):
        return (f"model.block_widths has {len(m.block_widths)} widths; {m.name} needs one "
                f"positive width per block ({blocks}), or () for the standard widths")
    return None


RESNET_OPTIONS = {  # always with BatchNorm
    "num_filters": 64,  # the first stage's width; each later stage doubles it
    # 3x3 stride-1 stem, no max-pool: for inputs under ~100 pixels. False: the ImageNet
    # stem (7x7/2 conv, 3x3/2 max-pool), which torchvision's and timm's weights need.
    "small_stem": True,
    # Each residual block's inner width, one per block in order (channel pruning sets
    # them: `jaxretrieval compress --method channels`); (): each stage's standard width.
    "block_widths": (),
}

def _dlib_face_resnet(m, bn_axis_name, dtype):
    del m, bn_axis_name  # no options, and no BatchNorm: dlib's is frozen into affine layers
    return DlibFaceResNet(dtype=dtype)


def _check_dlib_face_resnet(config):
    if config.image_size != DLIB_INPUT_SIZE or config.channels != 3:
        return (f"model.name=dlib_face_resnet takes {DLIB_INPUT_SIZE}x{DLIB_INPUT_SIZE} RGB "
                f"face chips; image_size={config.image_size} and channels={config.channels} "
                f"given: use image_size={DLIB_INPUT_SIZE} and channels=3")
    return None


BACKBONES = {
    "seed_cnn": Backbone(_seed_cnn, SEED_CNN_OPTIONS, _check_seed_cnn),
    **{name: Backbone(_resnet(name), RESNET_OPTIONS, _check_resnet) for name in RESNET_DEPTHS},
    # dlib's face descriptor network; its weights come with --config.init_from=FILE
    # (jaxretrieval.models.pretrained), which also sets the keys it needs.
    "dlib_face_resnet": Backbone(_dlib_face_resnet, {}, _check_dlib_face_resnet),
}


@dataclasses.dataclass(frozen=True)
class InputNorm:
    """How pixels are normalised before the backbone: the convention its weights expect."""

    # float32 [..., C] pixels in [0, 1] -> the backbone's float32 input.
    normalize: Callable
    # The channel counts it applies to.
    channels: tuple = (1, 3)


IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


def _imagenet(x):
    return (x - jnp.asarray(IMAGENET_MEAN_RGB, x.dtype)) / jnp.asarray(IMAGENET_STD_RGB, x.dtype)


INPUT_NORMS = {
    # Centred on 0 and spread to about +-2: what the package's own models train with.
    "centred": InputNorm(lambda x: (x - 0.5) * 4.0),
    # dlib's face network: (pixel - dlib's channel mean) / 256, on 0..255 pixels.
    "dlib": InputNorm(preprocess_dlib, channels=(3,)),
    # torchvision's and timm's ImageNet weights: RGB, ImageNet channel mean and std.
    "imagenet": InputNorm(_imagenet, channels=(3,)),
}


def check_input_norm(config) -> None:
    """Raises JaxRetrievalError when `config.model.input_norm` is unknown or does not fit
    `config.channels`."""
    name = config.model.input_norm
    if name not in INPUT_NORMS:
        raise JaxRetrievalError(f"bad config: model.input_norm={name!r}; use one of "
                                f"{', '.join(INPUT_NORMS)}")
    if config.channels not in INPUT_NORMS[name].channels:
        raise JaxRetrievalError(
            f"bad config: model.input_norm={name} normalises RGB images; channels="
            f"{config.channels} given: use channels=3, or model.input_norm=centred")


def backbone_options() -> dict:
    """Every backbone's `config.model` keys with their defaults, in registry order."""
    options = {}
    for name, backbone in BACKBONES.items():
        for key, default in backbone.options.items():
            if options.setdefault(key, default) != default:
                raise ValueError(f"backbone {name!r} gives model.{key} another default "
                                 f"({default!r}) than an earlier backbone ({options[key]!r})")
    return options


def get_backbone(name: str) -> Backbone:
    """The backbone called `name`; raises JaxRetrievalError naming the known ones."""
    if name not in BACKBONES:
        raise JaxRetrievalError(
            f"bad config: model.name={name!r}; use one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def check_backbone(config) -> None:
    """Raises JaxRetrievalError when `config.model` names no backbone or one that cannot run."""
    problem = get_backbone(config.model.name).check(config)
    if problem:
        raise JaxRetrievalError(f"bad config: {problem}")


# The name of the per-position weights of the final feature map, in EXPLAIN_COLLECTION.
POSITION_WEIGHTS = "position_weights"


class RetrievalModel(nn.Module):
    backbone: nn.Module
    pooling: str
    hidden_dim: int
    embedding_dim: int
    dtype: jnp.dtype = jnp.float32  # compute dtype of the backbone and the dense layers
    input_norm: str = "centred"  # a key of INPUT_NORMS
    projection_bias: bool = True
    # BatchNorm normalises with its running statistics and keeps them, in training too: the
    # statistics of an imported backbone outlast the few images of a small per-device batch.
    freeze_batch_norm: bool = False
    # The embedding's norm is a constant to differentiation (values unchanged; see
    # heads.l2_normalize).
    fixed_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        # Normalised in float32, then cast: bfloat16 pixels would round the normalisation.
        x = INPUT_NORMS[self.input_norm].normalize(x.astype(jnp.float32))
        # Only BatchNorm reads `train` in the backbones, so a frozen BatchNorm is the
        # backbone run as in evaluation.
        x = self.backbone(x.astype(self.dtype), train=train and not self.freeze_batch_norm)
        if self.has_variable(EXPLAIN_COLLECTION, POSITION_WEIGHTS):
            # Weights of 1 change nothing; the gradient of a result with respect to them is
            # each position's gradient x activation, summed over the channels.
            weights = self.get_variable(EXPLAIN_COLLECTION, POSITION_WEIGHTS)
            x = x * weights[..., None].astype(x.dtype)
        # Pooling in float32: GeM's power and mean lose too much in bfloat16.
        x = pool_features(x.astype(jnp.float32), self.pooling,
                          GeM() if self.pooling == "gem" else None)
        if self.hidden_dim:
            x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="hidden")(x))
        x = nn.Dense(self.embedding_dim, use_bias=self.projection_bias, dtype=self.dtype,
                     name="projection")(x)
        return l2_normalize(x.astype(jnp.float32), fixed_norm=self.fixed_norm)


def embed_with_feature_map(model: RetrievalModel, variables, x):
    """(embeddings [B, embedding_dim], feature map [B, H', W', C]): the model's output for
    float32 images `x` in [0, 1] and, from the same pass, the backbone's output before
    pooling (Flax's `capture_intermediates`, limited to the backbone's call)."""
    def is_backbone(module, method_name):
        return method_name == "__call__" and module.scope.path == ("backbone",)

    embeddings, state = model.apply(variables, x, capture_intermediates=is_backbone)
    return embeddings, state["intermediates"]["backbone"]["__call__"][0]


def stage_features(model: RetrievalModel, variables, x) -> dict:
    """{stage name: feature map [B, H, W, C]}, in the backbone's order, for float32 images
    `x` in [0, 1]: the output of each stage the backbone marks (`models.stages`). The last
    is the feature map the head pools."""
    _, state = model.apply(variables, x, mutable=[STAGE_COLLECTION])
    recorded = state.get(STAGE_COLLECTION, {}).get("backbone", {})
    names = sorted((name for name, values in recorded.items() if isinstance(values, tuple)),
                   key=stage_number)
    return {name: recorded[name][0] for name in names}


def build_model(config, bn_axis_name: str | None = None) -> RetrievalModel:
    """The model named by `config.model.name` with its pooling and projection head."""
    m = config.model
    dtype = jnp.dtype(config.dtype)
    backbone = get_backbone(m.name).build(m, bn_axis_name, dtype)
    return RetrievalModel(backbone=backbone, pooling=m.pooling,
                          hidden_dim=m.hidden_dim, embedding_dim=config.embedding_dim,
                          dtype=dtype, input_norm=m.input_norm,
                          projection_bias=m.projection_bias,
                          freeze_batch_norm=config.freeze_batch_norm)
