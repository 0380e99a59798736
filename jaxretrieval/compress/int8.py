"""int8 post-training quantisation of the embedder with Qwix, weights and activations.

Every convolution and dense layer (the projection, and the hidden layer when there is one)
computes in int8: its kernel is stored as int8 with one float32 scale per output channel
(symmetric, absmax), and its input is quantised to int8 with one static float32 scale per
layer, calibrated on a sample of the training images (the mean over calibration batches of
the largest absolute value per image: Qwix's static-range calibration, `QtProvider` with
`act_static_scale`). XLA runs the int8 x int8 products with int32 accumulation; BatchNorm,
the pooling, GeM and the biases stay float32 (a small share of the model, and cheap).

Stored (the compressed workdir's checkpoint), each kernel is `{"qvalue": int8, "scale":
float32}` and each layer's activation scale a float32 `<op>_lhs_scale` array beside it:
about a quarter of the float32 model's bytes. The embedding module rebuilds Qwix's
quantised parameters from that plain tree when it is applied, so nothing but arrays is ever
saved, and runs the model through Qwix's `PtqProvider`.

The seed CNN's oneDNN convolutions take float32 only, so the quantised model traces XLA's
own convolutions (`ops.conv.xla_convolutions`); its blocks are kept as Flax layers, not
fused, so that Qwix sees every convolution.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxretrieval.compress.base import Compressed, Method, Option, Source
from jaxretrieval.data.augment import preprocess
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import build_model
from jaxretrieval.models.cnn import SeedCNN
from jaxretrieval.ops.conv import xla_convolutions

CALIBRATION_BATCH = 32
# Qwix's names inside a quantised kernel: its int8 values and their scales.
QUANTISED_LEAVES = ("qvalue", "scale")


def _qwix():
    # Imported when used: only this method needs it, and importing it patches nothing.
    try:
        import qwix
    except ImportError:
        raise JaxRetrievalError(
            "the int8 method needs Qwix, a dependency of jaxretrieval: pip install "
            "'qwix>=0.1.8,<0.2'") from None
    return qwix


def _rules(qwix, rule_class):
    # One rule for every layer: int8 weights (per output channel) and int8 activations
    # with a static per-layer scale. Qwix's PTQ convolution needs both types the same.
    return [rule_class(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8,
                       act_static_scale=True)]


def unfused(model):
    """`model` with the seed CNN's blocks kept as Flax layers (Qwix intercepts those)."""
    if isinstance(model.backbone, SeedCNN):
        return model.clone(backbone=model.backbone.clone(fused=False))
    return model


def _stored_tree(tree) -> dict:
    """Qwix's quantised parameters as a plain nested dict of arrays: a kernel becomes
    {"qvalue", "scale"}, an activation scale its array (the wrappers' other attribute
    names are dropped)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = []
        for key in path:
            if hasattr(key, "key"):
                names.append(str(key.key))
            elif getattr(key, "name", None) in QUANTISED_LEAVES:
                names.append(key.name)
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = np.asarray(leaf)
    return out


def _lookup(tree: dict, path):
    node = tree
    for key in path:
        if hasattr(key, "key"):
            node = node[str(key.key)]
        elif getattr(key, "name", None) in QUANTISED_LEAVES:
            node = node[key.name]
    return node


class QuantisedModel:
    """The module a compressed int8 workdir embeds with: `apply(variables, x, **kwargs)` as
    Flax's, taking the plain stored tree (see the module docstring); `clone(**changes)`
    clones the float model it quantises."""

    def __init__(self, model):
        self.model = unfused(model)
        self._ptq = _qwix().quantize_model(self.model, _qwix().PtqProvider(
            _rules(_qwix(), _qwix().QuantizationRule)))

    def clone(self, **changes):
        return QuantisedModel(self.model.clone(**changes))

    def _qwix_params(self, params, x):
        # Qwix's own parameter tree (with how each array was quantised), shapes only, then
        # filled with the stored arrays by name.
        abstract = jax.eval_shape(self._ptq.init, jax.random.PRNGKey(0), x[:1])["params"]
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        try:
            filled = [_lookup(params, path) for path, _ in leaves]
        except (KeyError, TypeError):
            raise JaxRetrievalError(
                "the stored int8 model does not match its config: compress the source "
                "workdir again") from None
        return jax.tree_util.tree_unflatten(treedef, filled)

    def apply(self, variables, x, **kwargs):
        with xla_convolutions():
            variables = dict(variables, params=self._qwix_params(variables["params"], x))
            return self._ptq.apply(variables, x, **kwargs)

    def __getattr__(self, name):
        if name == "model":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def input_ranges(model, variables, images: np.ndarray, batch: int = CALIBRATION_BATCH) -> dict:
    """{module path: the mean over `images` (uint8) of each image's largest absolute input
    value} for every convolution and dense layer of `model`, run in float32: Qwix's
    static-range calibration (absmax per image, averaged), taken on the float model.

    Measured here rather than with Qwix's `QtProvider`, whose statistics are updated inside
    a custom VJP and escape a jit trace: this way the calibration is one compiled program.
    """
    model = unfused(model)

    def ranges(variables, x):
        found = {}

        def record(call, args, kwargs, context):
            if (context.method_name == "__call__"
                    and isinstance(context.module, (nn.Conv, nn.Dense))):
                inputs = args[0]
                per_image = jnp.max(jnp.abs(inputs.reshape(inputs.shape[0], -1)), axis=1)
                found["/".join(context.module.scope.path)] = jnp.sum(per_image)
            return call(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(variables, preprocess(x))
        return found

    ranges = jax.jit(ranges)
    totals = {}
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padded = np.zeros((batch,) + chunk.shape[1:], np.uint8)
        padded[:len(chunk)] = chunk
        # Padding images are black; their ranges are taken out again below.
        found = ranges(variables, padded)
        if len(chunk) < batch:
            blank = ranges(variables, np.zeros_like(padded))
            found = {k: v - blank[k] * (batch - len(chunk)) / batch for k, v in found.items()}
        for path, value in found.items():
            totals[path] = totals.get(path, 0.0) + float(value)
    return {path: total / len(images) for path, total in totals.items()}


def quantise(config, variables: dict, images: np.ndarray) -> dict:
    """The stored int8 form (plain arrays, see the module docstring) of the float model of
    `config` with `variables`, its activation scales calibrated on uint8 `images`."""
    qwix = _qwix()
    model = unfused(build_model(config))
    variables = jax.tree.map(jnp.asarray, variables)
    ranges = input_ranges(model, variables, images)
    ptq = qwix.quantize_model(model, qwix.PtqProvider(_rules(qwix, qwix.QuantizationRule)))
    with xla_convolutions():
        abstract = jax.eval_shape(ptq.init, jax.random.PRNGKey(0),
                                  preprocess(images[:1]))["params"]
    # Qwix's statistics, one per quantised input (`<op>_lhs_scale` in the abstract tree):
    # a count of 1 and the mean range as their sum.
    stats = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = [str(k.key) for k in path if hasattr(k, "key")]
        if not keys[-1].endswith("_lhs_scale"):
            continue
        module = "/".join(keys[:-1])
        if module not in ranges:
            raise JaxRetrievalError(f"int8: no calibration range for the layer {module}")
        scale_shape = _lookup_abstract(abstract, keys).shape
        node = stats
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1].removesuffix("_scale")] = {
            "count": jnp.ones((), jnp.int32),
            "sum_of_absmax": jnp.full(scale_shape, ranges[module], jnp.float32)}
    params = qwix.quantize_params(variables["params"], abstract, stats)
    return {"params": _stored_tree(params),
            "batch_stats": jax.tree.map(np.asarray, variables["batch_stats"])}


def _lookup_abstract(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


class Int8(Method):
    name = "int8"
    summary = ("int8 weights and activations (Qwix post-training quantisation, calibrated on "
               "training images); no fine-tuning")
    options = {
        "calibration_images": Option(256, "training images the activation scales are "
                                     "calibrated on", low=1, integer=True),
    }

    def check_source(self, config) -> None:
        if jnp.dtype(config.dtype) != jnp.float32:
            raise JaxRetrievalError(
                f"compress --method int8 quantises a float32 model; this run computes in "
                f"{config.dtype}")

    def compress(self, source: Source, options: dict) -> Compressed:
        images = source.train_images(options["calibration_images"])
        if len(images) == 0:
            raise JaxRetrievalError("compress --method int8: the training split is empty; "
                                    "there is nothing to calibrate on")
        stored = quantise(source.config, source.variables, images)
        return Compressed(config=source.config, variables=stored,
                          facts={"calibration_images": int(len(images)),
                                 "weights": "int8, per output channel",
                                 "activations": "int8, one static scale per layer"})

    def wrap_model(self, model, options: dict):
        return QuantisedModel(model)


INT8 = Int8()
