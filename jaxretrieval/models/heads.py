"""Retrieval heads: pool a feature map, project it, and L2-normalise the embedding."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class GeM(nn.Module):
    """Generalised-mean pooling with a learned exponent p (p=1: average, p->inf: max)."""

    initial_p: float = 3.0
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        # p below 1 is no longer a pooling between average and max (and 0 divides by zero).
        p = jnp.maximum(self.param("p", nn.initializers.constant(self.initial_p), ()), 1.0)
        x = jnp.maximum(x, self.eps) ** p
        return jnp.mean(x, axis=(1, 2)) ** (1.0 / p)


def pool_features(x, pooling: str, gem: GeM | None = None):
    """[B, H, W, C] -> [B, D] by `flatten`, `avg`, `max` or `gem`."""
    if pooling == "flatten":
        return x.reshape(x.shape[0], -1)
    if pooling == "avg":
        return jnp.mean(x, axis=(1, 2))
    if pooling == "max":
        return jnp.max(x, axis=(1, 2))
    if pooling == "gem":
        return gem(x)
    raise ValueError(f"unknown pooling {pooling!r}")


def l2_normalize(x, eps: float = 1e-12, *, fixed_norm: bool = False):
    """`x` / |x| over the last axis. `fixed_norm`: the same values, with the norm a constant to
    differentiation, so that a gradient measures what moves the vector, not its length (what
    explanations of a cosine similarity differentiate: `jaxretrieval.explain`)."""
    scale = jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))
    return x * (jax.lax.stop_gradient(scale) if fixed_norm else scale)
