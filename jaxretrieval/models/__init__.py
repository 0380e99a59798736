"""Models: backbones found by name, and the retrieval model that wraps one.

`RetrievalModel(x)` returns {"embedding": unit vectors [B, d], "logits": [B, classes]};
`RetrievalModel.embed(x)` the embedding alone. Inputs are float32 images in [0, 1].
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models.cnn import SeedCNN
from jaxretrieval.models.heads import GeM, l2_normalize, pool_features

BACKBONES = {"seed_cnn": SeedCNN}


class RetrievalModel(nn.Module):
    backbone: nn.Module
    pooling: str
    hidden_dim: int
    embedding_dim: int
    num_classes: int
    classifier_scale: float

    def setup(self):
        self.gem = GeM() if self.pooling == "gem" else None
        self.hidden = nn.Dense(self.hidden_dim) if self.hidden_dim else None
        self.projection = nn.Dense(self.embedding_dim)
        # A cosine classifier: unit embeddings against unit class weights, scaled, so the
        # softmax loss shapes the same angles that retrieval compares.
        self.class_weights = self.param("class_weights", nn.initializers.lecun_normal(),
                                        (self.embedding_dim, self.num_classes))

    def embed(self, x, train: bool = False):
        x = self.backbone((x - 0.5) * 4.0, train=train)  # centre [0, 1] pixels
        x = pool_features(x, self.pooling, self.gem)
        if self.hidden is not None:
            x = nn.relu(self.hidden(x))
        return l2_normalize(self.projection(x).astype(jnp.float32))

    def __call__(self, x, train: bool = False):
        embedding = self.embed(x, train=train)
        logits = self.classifier_scale * embedding @ l2_normalize(self.class_weights.T).T
        return {"embedding": embedding, "logits": logits}


def build_model(config, num_classes: int, bn_axis_name: str | None = None) -> RetrievalModel:
    """The model named by `config.model.name`, with its retrieval and classification heads."""
    m = config.model
    if m.name not in BACKBONES:
        raise JaxRetrievalError(
            f"bad config: model.name={m.name!r}; use one of {', '.join(sorted(BACKBONES))}")
    backbone = BACKBONES[m.name](widths=tuple(m.widths), kernel_size=m.kernel_size,
                                 padding=m.padding, batch_norm=m.batch_norm,
                                 bn_axis_name=bn_axis_name)
    return RetrievalModel(backbone=backbone, pooling=m.pooling, hidden_dim=m.hidden_dim,
                          embedding_dim=config.embedding_dim, num_classes=num_classes,
                          classifier_scale=m.classifier_scale)
