"""Models: backbones found by name, and the retrieval model that wraps one.

`RetrievalModel(x, train)` maps float32 images in [0, 1] to L2-normalised embeddings
[B, embedding_dim]. Anything a loss learns besides the model (classifier weights, proxies)
belongs to the loss (`jaxretrieval.losses`), not to the model.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models.cnn import SeedCNN
from jaxretrieval.models.heads import GeM, l2_normalize, pool_features
from jaxretrieval.models.resnet import resnet18, resnet50


def _seed_cnn(m, bn_axis_name, dtype):
    return SeedCNN(widths=tuple(m.widths), kernel_size=m.kernel_size, padding=m.padding,
                   batch_norm=m.batch_norm, bn_axis_name=bn_axis_name, dtype=dtype)


def _resnet(factory):
    return lambda m, bn_axis_name, dtype: factory(
        num_filters=m.num_filters, small_stem=m.small_stem, bn_axis_name=bn_axis_name,
        dtype=dtype)


# name -> (model config, BatchNorm axis name, compute dtype) -> backbone module returning a
# feature map.
BACKBONES = {
    "seed_cnn": _seed_cnn,
    "resnet18": _resnet(resnet18),
    "resnet50": _resnet(resnet50),
}


class RetrievalModel(nn.Module):
    backbone: nn.Module
    pooling: str
    hidden_dim: int
    embedding_dim: int
    dtype: jnp.dtype = jnp.float32  # compute dtype of the backbone and the dense layers

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.backbone(((x - 0.5) * 4.0).astype(self.dtype), train=train)  # centred pixels
        # Pooling in float32: GeM's power and mean lose too much in bfloat16.
        x = pool_features(x.astype(jnp.float32), self.pooling,
                          GeM() if self.pooling == "gem" else None)
        if self.hidden_dim:
            x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="hidden")(x))
        x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="projection")(x)
        return l2_normalize(x.astype(jnp.float32))


def build_model(config, bn_axis_name: str | None = None) -> RetrievalModel:
    """The model named by `config.model.name` with its pooling and projection head."""
    m = config.model
    if m.name not in BACKBONES:
        raise JaxRetrievalError(
            f"bad config: model.name={m.name!r}; use one of {', '.join(sorted(BACKBONES))}")
    dtype = jnp.dtype(config.dtype)
    return RetrievalModel(backbone=BACKBONES[m.name](m, bn_axis_name, dtype), pooling=m.pooling,
                          hidden_dim=m.hidden_dim, embedding_dim=config.embedding_dim,
                          dtype=dtype)
