"""The seed's convolutional backbone: (Conv-ReLU-MaxPool) x len(widths)."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class SeedCNN(nn.Module):
    """Conv{w}-Pool per width, as in the seed's Keras model (3x3 convs, 2x2 max-pools).

    Returns the last feature map [B, H', W', widths[-1]]; the head pools and projects it.
    """

    widths: Sequence[int] = (32, 64, 128)
    kernel_size: int = 3
    padding: str = "VALID"
    batch_norm: bool = False
    bn_axis_name: str | None = None  # averages BatchNorm statistics across devices
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in self.widths:
            x = nn.Conv(width, (self.kernel_size, self.kernel_size), padding=self.padding,
                        use_bias=not self.batch_norm, dtype=self.dtype)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                 axis_name=self.bn_axis_name if train else None,
                                 dtype=self.dtype)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x
