"""ResNet backbones (v1.5: the stride sits on the 3x3 conv of a bottleneck) for retrieval.

`ResNet(x)` returns the feature map [B, H', W', C] after the last ReLU, with no pooling and
no classifier; the retrieval head pools and projects it, as it does for SeedCNN.

With `small_stem=False` the network is torchvision's ResNet layer for layer (the 7x7/2 stem
padded by 3, the 3x3/2 max-pool padded by 1, the strided 3x3 conv, the 1x1 strided
projection with BatchNorm, BatchNorm's epsilon 1e-5), so torchvision's and timm's weights
load into it unchanged (`jaxretrieval.models.torch_import`). `RESNET_DEPTHS` lists the
family by name.
"""

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models.stages import stage_output

# He-normal over fan_out, as torchvision initialises its ResNets: the variance is kept
# for the backward pass through each ReLU. A plain (untruncated) normal, as there.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Explicit symmetric padding: "SAME" pads a stride-2 conv on an even input (0, 1), which
# shifts the sampling grid by a pixel against the standard (1, 1).
PAD_1 = ((1, 1), (1, 1))
PAD_3 = ((3, 3), (3, 3))


class BasicBlock(nn.Module):
    """Two 3x3 convs; the block's output has `filters` channels, the first conv's `inner`
    (default `filters`: fewer after channel pruning, `jaxretrieval.compress.channels`)."""

    filters: int
    strides: int
    conv: Callable[..., nn.Module]  # nn.Conv with the trunk's settings bound
    norm: Callable[..., nn.Module]  # nn.BatchNorm with the trunk's settings bound
    inner: int | None = None

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.inner or self.filters, (3, 3), (self.strides, self.strides),
                      padding=PAD_1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=PAD_1, name="conv2")(y)
        # Zero scale: each block starts out passing on just its shortcut, so a deep net
        # trains like a shallow one at first (Goyal et al., 2017).
        y = self.norm(scale_init=nn.initializers.zeros, name="bn2")(y)
        return nn.relu(y + project_shortcut(residual, y.shape[-1], self.strides, self.conv,
                                            self.norm))


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to 4 * `filters` channels; the first two convs
    have `inner` channels (default `filters`)."""

    filters: int
    strides: int
    conv: Callable[..., nn.Module]  # nn.Conv with the trunk's settings bound
    norm: Callable[..., nn.Module]  # nn.BatchNorm with the trunk's settings bound
    inner: int | None = None
    expansion = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        inner = self.inner or self.filters
        y = self.conv(inner, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        # v1.5: striding the 3x3 rather than the first 1x1 loses no input pixels.
        y = self.conv(inner, (3, 3), (self.strides, self.strides), padding=PAD_1,
                      name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * self.expansion, (1, 1), name="conv3")(y)
        y = self.norm(scale_init=nn.initializers.zeros, name="bn3")(y)  # see BasicBlock
        return nn.relu(y + project_shortcut(residual, y.shape[-1], self.strides, self.conv,
                                            self.norm))


def project_shortcut(x, channels: int, strides: int, conv, norm):
    """The identity, or a strided 1x1 conv + BN where the block changes the shape."""
    if x.shape[-1] == channels and strides == 1:
        return x
    x = conv(channels, (1, 1), (strides, strides), name="shortcut_conv")(x)
    return norm(name="shortcut_bn")(x)


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
    """A ResNet trunk: stem, then stages of residual blocks doubling the width each stage.

    `small_stem` swaps the ImageNet 7x7/2 conv + 3x3/2 max-pool for one 3x3/1 conv, so
    small inputs (32x32, 64x64) are not shrunk 4x before the first block.
    `block_widths`, one per block in order, sets each block's inner width (channel pruning
    narrows the convs inside the blocks; what the shortcuts add up keeps its width).
    """

    stage_sizes: Sequence[int]
    block: str  # "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101/152)
    num_filters: int = 64
    small_stem: bool = False
    block_widths: Sequence[int] = ()
    bn_axis_name: str | None = None  # averages BatchNorm statistics across devices
    dtype: jnp.dtype = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.block not in BLOCKS:
            raise JaxRetrievalError(
                f"bad ResNet block {self.block!r}; use one of {', '.join(sorted(BLOCKS))}")
        block_cls = BLOCKS[self.block]
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init,
                                 dtype=self.dtype)
        # Outside training there is no batch to average over devices, and no axis to name.
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, axis_name=self.bn_axis_name if train else None,
                                 dtype=self.dtype)

        if self.small_stem:
            x = conv(self.num_filters, (3, 3), padding=PAD_1, name="stem_conv")(x)
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), padding=PAD_3, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        if not self.small_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=PAD_1)
        x = stage_output(self, "stage0", x)

        if self.block_widths and len(self.block_widths) != sum(self.stage_sizes):
            raise JaxRetrievalError(
                f"block_widths gives {len(self.block_widths)} widths for "
                f"{sum(self.stage_sizes)} blocks; give one per block, or none")
        widths = iter(self.block_widths)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                # The first stage keeps the stem's resolution; each later one halves it.
                strides = 2 if stage > 0 and index == 0 else 1
                x = block_cls(self.num_filters * 2 ** stage, strides, conv, norm,
                              inner=next(widths, None),
                              name=f"stage{stage + 1}_block{index + 1}")(x)
            x = stage_output(self, f"stage{stage + 1}", x)
        return x


# name -> (blocks per stage, block kind), as He et al. (2016) define the family.
RESNET_DEPTHS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
    "resnet152": ((3, 8, 36, 3), "bottleneck"),
}


def resnet(name: str, **kwargs) -> ResNet:
    """The ResNet called `name` (a key of RESNET_DEPTHS) with ResNet's other fields."""
    stage_sizes, block = RESNET_DEPTHS[name]
    return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return resnet("resnet18", **kwargs)


def resnet34(**kwargs) -> ResNet:
    return resnet("resnet34", **kwargs)


def resnet50(**kwargs) -> ResNet:
    return resnet("resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    return resnet("resnet101", **kwargs)


def resnet152(**kwargs) -> ResNet:
    return resnet("resnet152", **kwargs)
