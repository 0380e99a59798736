"""dlib's face recognition ResNet as a Flax backbone, and its weights from dlib's file.

The network is the one dlib ships as `dlib_face_recognition_resnet_model_v1.dat` (the
`face-recognition-models` package): a 150x150 RGB face chip in, a 128-d descriptor out.

    7x7/2 conv, affine, relu, 3x3/2 max-pool
    stages of residual blocks: 32 filters x 3, 64 x 4, 128 x 3, 256 x 3, 256 x 1; each stage
        after the first starts with a down-sampling block
    global average pool, 128-d fully-connected layer without bias

A block is conv 3x3 (stride 2 in a down-sampling block), affine, relu, conv 3x3, affine,
plus its shortcut, then relu. A down-sampling block's shortcut is the 2x2/2 average pool of
its input, with no projection: dlib adds two tensors of different shapes by zero-filling
each past its end in every dimension, so the pooled input feeds the first channels, and
where the strided conv and the pool disagree on the spatial size (8 -> 3 against 4, and
4 -> 1 against 2) the sum takes the larger. Every convolution has a bias; every affine is a
per-channel scale and shift (dlib's batch norm, frozen). dlib pads a strided convolution or
pooling by nothing and a stride-1 3x3 convolution by one pixel on each side.

`DlibFaceResNet(x)` maps dlib-normalised chips (`preprocess_dlib`) to the feature map
[B, 2, 2, 256] before the global average pool; the retrieval head pools it and projects it
with the file's 128-d layer (`variables_from_dlib` returns that kernel apart).
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models.stages import stage_output

INPUT_SIZE = 150
# input_rgb_image_sized: (pixel - channel mean) / 256, the means of dlib's default and file.
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)
DLIB_PIXEL_SCALE = 256.0
EMBEDDING_DIM = 128

# (filters, blocks) per stage; every stage but the first starts by halving the resolution.
STAGES = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))

VALID = ((0, 0), (0, 0))
PAD_1 = ((1, 1), (1, 1))

# Only for a fresh start; the point of this network is its trained weights.
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def preprocess_dlib(images) -> jnp.ndarray:
    """RGB images [..., 3] to dlib's input: float32 (pixel - channel mean) / 256.

    uint8 images hold pixel values 0..255; floating-point ones are taken as the package's
    [0, 1] pixels and scaled by 255 first.
    """
    images = jnp.asarray(images)
    pixels = images.astype(jnp.float32)
    if not jnp.issubdtype(images.dtype, jnp.integer):
        pixels = pixels * 255.0
    return (pixels - jnp.asarray(DLIB_MEAN_RGB, jnp.float32)) / DLIB_PIXEL_SCALE


class Affine(nn.Module):
    """A per-channel scale and shift: dlib's affine_ layer in its convolutional mode."""

    dtype: jnp.dtype = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        return x.astype(self.dtype) * scale.astype(self.dtype) + bias.astype(self.dtype)


def add_zero_padded(a, b):
    """dlib's add_prev: the sum over the larger size in each dimension, zero-filled past the
    end of the smaller input (bottom rows, right columns, last channels)."""
    shape = tuple(max(m, n) for m, n in zip(a.shape, b.shape))

    def pad(x):
        return jnp.pad(x, [(0, size - dim) for size, dim in zip(shape, x.shape)])

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    """conv, affine, relu, conv, affine; plus the input, or its 2x2 average when `down`."""

    filters: int
    down: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, self.filters, (3, 3), use_bias=True,
                                 kernel_init=conv_init, dtype=self.dtype)
        if self.down:
            y = conv(strides=(2, 2), padding=VALID, name="conv1")(x)
            shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        else:
            y = conv(padding=PAD_1, name="conv1")(x)
            shortcut = x
        y = nn.relu(Affine(self.dtype, name="affine1")(y))
        y = conv(padding=PAD_1, name="conv2")(y)
        y = Affine(self.dtype, name="affine2")(y)
        return nn.relu(add_zero_padded(y, shortcut.astype(y.dtype)))


def block_names():
    """The blocks' module names, in order."""
    return [f"stage{stage + 1}_block{index + 1}"
            for stage, (_, blocks) in enumerate(STAGES) for index in range(blocks)]


class DlibFaceResNet(nn.Module):
    """The trunk of dlib's face ResNet: [B, 150, 150, 3] -> feature map [B, 2, 2, 256].

    It takes `preprocess_dlib`'s input. Its stages (`models.stages`): `stage0` (the stem)
    35x35x32, `stage1` 35x35x32, `stage2` 17x17x64, `stage3` 8x8x128, `stage4` 4x4x256 and `stage5`
    2x2x256, the feature map itself. There is no batch norm (dlib's is frozen into the
    affine layers), so `train` changes nothing.
    """

    dtype: jnp.dtype = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(STAGES[0][0], (7, 7), (2, 2), padding=VALID, use_bias=True,
                    kernel_init=conv_init, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(Affine(self.dtype, name="stem_affine")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        x = stage_output(self, "stage0", x)
        names = iter(block_names())
        for stage, (filters, blocks) in enumerate(STAGES):
            for index in range(blocks):
                x = ResidualBlock(filters, down=stage > 0 and index == 0, dtype=self.dtype,
                                  name=next(names))(x)
            x = stage_output(self, f"stage{stage + 1}", x)
        return x


def dlib_layer_plan() -> list:
    """The layers dlib's file holds for this network, input to loss: (type, fixed params).

    Tags and skips are in the file only as markers ("tag_or_skip"); their positions are part
    of the plan all the same.
    """
    def con(filters, kernel, stride, padding):
        return ("con", {"num_filters": filters, "kernel": (kernel, kernel),
                        "stride": (stride, stride), "padding": (padding, padding),
                        "use_relu": False})

    def pool(kind, kernel, stride):
        return (kind, {"kernel": (kernel, kernel), "stride": (stride, stride),
                       "padding": (0, 0)})

    affine = ("affine", {"mode": "conv", "disabled": False})
    relu = ("relu", {"disabled": False})
    tag_or_skip = ("tag_or_skip", {})
    plan = [("input_rgb_image_sized", {"rows": INPUT_SIZE, "columns": INPUT_SIZE}),
            con(STAGES[0][0], 7, 2, 0), affine, relu, pool("max_pool", 3, 2)]
    for stage, (filters, blocks) in enumerate(STAGES):
        for index in range(blocks):
            down = stage > 0 and index == 0
            plan += [tag_or_skip, con(filters, 3, 2 if down else 1, 0 if down else 1), affine,
                     relu, con(filters, 3, 1, 1), affine]
            if down:  # tag the block's output, skip back to its input, pool that
                plan += [tag_or_skip, tag_or_skip, pool("avg_pool", 2, 2)]
            plan += [("add_prev", {}), relu]
    plan += [pool("avg_pool", 0, 1),  # a zero-sized window: the whole input
             ("fc", {"num_outputs": EMBEDDING_DIM, "num_inputs": STAGES[-1][0],
                     "bias_mode": "no_bias"}),
             ("loss_metric", {})]
    return plan


def check_plan(layers) -> None:
    plan = dlib_layer_plan()
    if len(layers) != len(plan):
        raise JaxRetrievalError(
            f"this dlib network has {len(layers)} layers, dlib's face ResNet has {len(plan)}: "
            "use dlib_face_recognition_resnet_model_v1.dat (face-recognition-models)")
    for position, (layer, (kind, fixed)) in enumerate(zip(layers, plan)):
        found = {key: layer.params.get(key) for key in fixed}
        if layer.type != kind or found != fixed:
            raise JaxRetrievalError(
                f"this dlib network is not dlib's face ResNet: layer {position} is "
                f"{layer.type} {found}, expected {kind} {fixed}; use "
                "dlib_face_recognition_resnet_model_v1.dat (face-recognition-models)")
    means = tuple(layers[0].params[key] for key in ("avg_red", "avg_green", "avg_blue"))
    if not np.allclose(means, DLIB_MEAN_RGB, rtol=0, atol=1e-4):
        raise JaxRetrievalError(
            f"this dlib network expects input channel means {means}, preprocess_dlib uses "
            f"{DLIB_MEAN_RGB}; only dlib's own face ResNet weights are supported")


def conv_params(layer) -> dict:
    filters = layer.tensors["filters"]  # (out, in, rows, cols)
    biases = layer.tensors.get("biases", np.zeros(filters.shape[0], np.float32))
    return {"kernel": np.ascontiguousarray(filters.transpose(2, 3, 1, 0)),  # HWIO
            "bias": biases.reshape(-1).copy()}


def affine_params(layer) -> dict:
    return {"scale": layer.tensors["gamma"].reshape(-1).copy(),
            "bias": layer.tensors["beta"].reshape(-1).copy()}


def variables_from_dlib(layers) -> tuple:
    """(backbone_params, head_kernel) from `dlib_format.read_dlib_network`'s layers.

    backbone_params is DlibFaceResNet's param tree (apply it as {"params": backbone_params});
    head_kernel is the 128-d layer's float32 [256, 128] kernel, applied to the pooled
    feature as `features @ head_kernel`, with no bias.
    """
    check_plan(layers)
    convs = [conv_params(layer) for layer in layers if layer.type == "con"]
    affines = [affine_params(layer) for layer in layers if layer.type == "affine"]
    params = {"stem_conv": convs[0], "stem_affine": affines[0]}
    for index, name in enumerate(block_names()):
        params[name] = {"conv1": convs[1 + 2 * index], "affine1": affines[1 + 2 * index],
                        "conv2": convs[2 + 2 * index], "affine2": affines[2 + 2 * index]}
    fc = next(layer for layer in layers if layer.type == "fc")
    head_kernel = fc.tensors["weights"].reshape(fc.params["num_inputs"],
                                                fc.params["num_outputs"]).copy()
    return params, head_kernel
