"""The seed's convolutional backbone: (Conv-ReLU-MaxPool) x len(widths)."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxretrieval.models.stages import stage_output
from jaxretrieval.ops.conv import conv_general_dilated, conv_relu_pool


class SeedCNN(nn.Module):
    """Conv{w}-Pool per width, as in the seed's Keras model (3x3 convs, 2x2 max-pools).

    Returns the last feature map [B, H', W', widths[-1]]; the head pools and projects it.
    Each conv/pool block is a stage (`stage1`, ...; `models.stages`).
    """

    widths: Sequence[int] = (32, 64, 128)
    kernel_size: int = 3
    padding: str = "VALID"
    batch_norm: bool = False
    bn_axis_name: str | None = None  # averages BatchNorm statistics across devices
    dtype: jnp.dtype = jnp.float32
    # False: every block is Flax layers when evaluated too, for tools that intercept them
    # (int8 quantisation, `jaxretrieval.compress.int8`).
    fused: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        # Without BatchNorm a block is one fused call when evaluated (ops.conv_relu_pool);
        # nn.Conv still owns the parameters, so checkpoints are the same either way.
        fused = (self.fused and not self.batch_norm and jnp.dtype(self.dtype) == jnp.float32
                 and not self.is_initializing())
        for index, width in enumerate(self.widths):
            conv = nn.Conv(width, (self.kernel_size, self.kernel_size), padding=self.padding,
                           use_bias=not self.batch_norm, dtype=self.dtype,
                           conv_general_dilated=conv_general_dilated)
            if fused:
                params = conv.variables["params"]
                x = conv_relu_pool(x, params["kernel"], params["bias"], self.padding,
                                   max_pool_2x2)
                x = stage_output(self, f"stage{index + 1}", x)
                continue
            x = conv(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                 axis_name=self.bn_axis_name if train else None,
                                 dtype=self.dtype)(x)
            x = nn.relu(x)
            x = max_pool_2x2(x)
            x = stage_output(self, f"stage{index + 1}", x)
        return x


@jax.custom_vjp
def max_pool_2x2(x):
    """2x2 max-pool, stride 2, VALID (an odd last row or column is dropped, as Keras does).

    The values of `nn.max_pool(x, (2, 2), strides=(2, 2))` (XLA's reduce_window, the fastest
    forward on CPU), with a gradient written as a reshape and a one-hot of each window's
    first maximum, the element reduce_window's own gradient picks: XLA lowers that one to a
    select-and-scatter, which is slow on CPU.
    """
    return _reduce_window_max(x)


def _reduce_window_max(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _max_pool_forward(x):
    return _reduce_window_max(x), x


def _max_pool_backward(x, grad):
    batch, height, width, channels = x.shape
    rows, cols = height // 2, width // 2
    windows = x[:, : rows * 2, : cols * 2].reshape(batch, rows, 2, cols, 2, channels)
    windows = windows.transpose(0, 1, 3, 5, 2, 4).reshape(batch, rows, cols, channels, 4)
    first_max = jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=grad.dtype)
    spread = (first_max * grad[..., None]).reshape(batch, rows, cols, channels, 2, 2)
    spread = spread.transpose(0, 1, 4, 2, 5, 3).reshape(batch, rows * 2, cols * 2, channels)
    return (jnp.pad(spread, ((0, 0), (0, height - rows * 2), (0, width - cols * 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)
