"""Training losses for retrieval embeddings, by name: proxy losses and pair losses.

Each loss is a `Loss(init, apply, options)`:

    params = loss.init(rng, num_classes, embedding_dim, config)  # {} for pair losses
    value = loss.apply(params, embeddings, labels, config)       # float32 scalar

`embeddings` are float32 [B, d] and already of unit length; `labels` are int32 [B] in
[0, num_classes). Hyper-parameters come from `config.loss_options`; a missing key (or a
config without `loss_options`) takes its default. Each one is declared once, with its
default and its valid range, in the `options` of its loss's `LOSSES` entry: the config's
`loss_options` and their checks are built from there, so adding a loss, or an option of
one, touches this file alone.

Proxy losses (softmax, normalized_softmax, arcface) score each example against learned
per-class parameters. Pair losses (contrastive, triplet, multi_similarity, supcon) compare
the examples of a batch with each other, so under data parallelism they must see the whole
global batch: call `gather_batch` in the per-device step and pass its result to `apply`.
Proxy losses give the same gradients with or without the gather.

All losses are jit- and grad-safe: masks instead of Python branches, and no log, sqrt or
division ever sees a zero, so gradients stay finite even for degenerate batches.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.parallel import DEVICE_AXIS

# Similarities of unit vectors lie in [-1, 1]; this stands in for "no such pair" in a
# min/max and is far enough out that no margin moves a real similarity past it.
_NO_PAIR = 1e9
# A logit whose exp is exactly 0 in float32, used instead of -inf so that a row with
# nothing left stays finite (and so do its gradients).
_MASKED_LOGIT = -1e9
# arcface keeps cos(theta) this far inside (-1, 1): sin(theta) = sqrt(1 - cos^2) has an
# infinite derivative at +-1.
_COSINE_CLIP = 1e-6


# The ranges a loss option may take, by the words that finish "use a value ...".
OPTION_RANGES = {
    "above 0": lambda value: value > 0,
    "of 0 or more": lambda value: value >= 0,
    "in [0, pi/2)": lambda value: 0 <= value < math.pi / 2,
    "of any size": lambda value: True,
}


@dataclasses.dataclass(frozen=True)
class LossOption:
    """A hyper-parameter of a loss, read from `config.loss_options` under its key."""

    default: float
    valid: str = "above 0"  # a key of OPTION_RANGES


@dataclasses.dataclass(frozen=True)
class Loss:
    """A named loss: `init` makes its learned parameters, `apply` scores a batch."""

    init: Callable  # init(rng, num_classes, embedding_dim, config) -> params pytree
    apply: Callable  # apply(params, embeddings [B, d], labels [B], config) -> float32 scalar
    # The keys `apply` reads from `config.loss_options`. Keys are global across losses (a
    # sum of losses reads each term's own), so each starts with its loss's name.
    options: dict = dataclasses.field(default_factory=dict)  # key -> LossOption


def gather_batch(embeddings, labels, axis_name=DEVICE_AXIS):
    """Concatenates every device's examples, in device order: ([global, d], [global]).

    Call inside `pmap`/`shard_map` and compute the loss on the result on every device.
    Differentiating through the gather sends every device's cotangent back to the examples'
    own device, so each device's parameter gradient is (number of devices) x its share;
    averaging the gradients with `pmean` (not `psum`) gives exactly the gradient of the
    loss on the global batch.
    """
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    return gather(embeddings), gather(labels)


def loss_option(config, key: str) -> float:
    """`config.loss_options[key]`, or its default when the key or `loss_options` is absent."""
    default = LOSS_OPTIONS[key].default
    options = config.get("loss_options") if config is not None else None
    return float(default if options is None else options.get(key, default))


# Proxy losses.

def _init_linear_classifier(rng, num_classes, embedding_dim, config):
    kernel = jax.nn.initializers.lecun_normal()(rng, (embedding_dim, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def _init_proxies(rng, num_classes, embedding_dim, config):
    # Unit-length start: only the direction of a proxy is used, and a unit norm makes the
    # optimizer's step size mean the same for every embedding_dim.
    proxies = jax.random.normal(rng, (num_classes, embedding_dim), jnp.float32)
    return {"proxies": _unit_rows(proxies)}


def _unit_rows(x):
    # The floor only matters for an all-zero row, which would otherwise divide by zero.
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, 1e-12))


def _mean_cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _softmax_loss(params, embeddings, labels, config):
    embeddings = jnp.asarray(embeddings, jnp.float32)
    logits = embeddings @ params["kernel"] + params["bias"]
    return _mean_cross_entropy(logits, labels)


def _normalized_softmax_loss(params, embeddings, labels, config):
    scale = loss_option(config, "normalized_softmax_scale")
    cosines = jnp.asarray(embeddings, jnp.float32) @ _unit_rows(params["proxies"]).T
    return _mean_cross_entropy(scale * cosines, labels)


def _arcface_loss(params, embeddings, labels, config):
    scale = loss_option(config, "arcface_scale")
    margin = loss_option(config, "arcface_margin")
    cosines = jnp.asarray(embeddings, jnp.float32) @ _unit_rows(params["proxies"]).T
    clipped = jnp.clip(cosines, -1.0 + _COSINE_CLIP, 1.0 - _COSINE_CLIP)
    sines = jnp.sqrt(1.0 - clipped * clipped)
    # cos(theta + m) by the sum formula: no arccos, whose gradient is infinite at +-1.
    with_margin = clipped * math.cos(margin) - sines * math.sin(margin)
    # Past theta = pi - m, cos(theta + m) grows again as theta grows, which would reward
    # moving away from the class; continue there with a fixed penalty instead, as the
    # ArcFace reference implementation does.
    with_margin = jnp.where(clipped > math.cos(math.pi - margin), with_margin,
                            clipped - margin * math.sin(margin))
    is_target = jax.nn.one_hot(labels, cosines.shape[1], dtype=jnp.bool_)
    logits = scale * jnp.where(is_target, with_margin, cosines)
    return _mean_cross_entropy(logits, labels)


# Pair losses: every ordered pair (i, j), i != j, of the batch; i is the anchor.

def _pairs(embeddings, labels):
    """Similarities [B, B] and the masks of positive pairs (same label) and negative pairs."""
    embeddings = jnp.asarray(embeddings, jnp.float32)
    similarities = embeddings @ embeddings.T
    same_label = labels[:, None] == labels[None, :]
    not_self = ~jnp.eye(labels.shape[0], dtype=jnp.bool_)
    return similarities, same_label & not_self, ~same_label


def _masked_mean(values, mask):
    """Mean of `values` where `mask` holds; 0 when it holds nowhere."""
    count = jnp.sum(mask)
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1)


def _hardest(similarities, positives, negatives):
    """Per anchor: the lowest positive and the highest negative similarity (+-_NO_PAIR if none)."""
    hardest_positive = jnp.min(jnp.where(positives, similarities, _NO_PAIR), axis=1)
    hardest_negative = jnp.max(jnp.where(negatives, similarities, -_NO_PAIR), axis=1)
    return hardest_positive, hardest_negative


def _log_one_plus_sum_exp(x, mask):
    """Per row: log(1 + sum of exp(x) where mask), stable for large x; 0 for an empty row."""
    # The extra zero column is the "1 +": it also keeps the row's maximum finite.
    padded = jnp.concatenate(
        [jnp.zeros_like(x[:, :1]), jnp.where(mask, x, _MASKED_LOGIT)], axis=1)
    return jax.nn.logsumexp(padded, axis=1)


def _contrastive_loss(params, embeddings, labels, config):
    """Mean over positive pairs of (1 - s) plus mean over violating negatives of (s - margin).

    Averaging negatives only over those above the margin keeps the push from fading as
    most negatives become easy; each half is 0 when it has no pairs.
    """
    margin = loss_option(config, "contrastive_margin")
    similarities, positives, negatives = _pairs(embeddings, labels)
    positive_term = _masked_mean(1.0 - similarities, positives)
    violations = jax.nn.relu(similarities - margin)
    negative_term = _masked_mean(violations, negatives & (violations > 0))
    return positive_term + negative_term


def _triplet_loss(params, embeddings, labels, config):
    """Batch-hard triplets: mean over anchors of relu(s_hardest_neg - s_hardest_pos + margin).

    Anchors without a positive or without a negative are left out; 0 if none remain.
    """
    margin = loss_option(config, "triplet_margin")
    similarities, positives, negatives = _pairs(embeddings, labels)
    hardest_positive, hardest_negative = _hardest(similarities, positives, negatives)
    per_anchor = jax.nn.relu(hardest_negative - hardest_positive + margin)
    has_triplet = jnp.any(positives, axis=1) & jnp.any(negatives, axis=1)
    return _masked_mean(per_anchor, has_triplet)


def _multi_similarity_loss(params, embeddings, labels, config):
    """Multi-similarity loss (Wang et al. 2019) with its pair mining, mean over all anchors.

    A negative is kept when s + epsilon exceeds the anchor's lowest positive similarity, a
    positive when s - epsilon is below its highest negative similarity; an anchor without
    positives or without negatives thus keeps no pairs and contributes 0.
    """
    alpha = loss_option(config, "multi_similarity_alpha")
    beta = loss_option(config, "multi_similarity_beta")
    threshold = loss_option(config, "multi_similarity_lambda")
    epsilon = loss_option(config, "multi_similarity_epsilon")
    similarities, positives, negatives = _pairs(embeddings, labels)
    hardest_positive, hardest_negative = _hardest(similarities, positives, negatives)
    kept_negatives = negatives & (similarities + epsilon > hardest_positive[:, None])
    kept_positives = positives & (similarities - epsilon < hardest_negative[:, None])
    positive_term = _log_one_plus_sum_exp(-alpha * (similarities - threshold), kept_positives)
    negative_term = _log_one_plus_sum_exp(beta * (similarities - threshold), kept_negatives)
    return jnp.mean(positive_term / alpha + negative_term / beta)


def _supcon_loss(params, embeddings, labels, config):
    """Supervised contrastive loss (Khosla et al. 2020, the mean-outside-the-log form).

    Per anchor: mean over its positives p of -log(exp(s_ap / t) / sum_{k != a} exp(s_ak / t));
    mean over the anchors that have a positive, 0 if none do.
    """
    temperature = loss_option(config, "supcon_temperature")
    similarities, positives, _ = _pairs(embeddings, labels)
    is_self = jnp.eye(labels.shape[0], dtype=jnp.bool_)
    logits = jnp.where(is_self, _MASKED_LOGIT, similarities / temperature)
    log_probabilities = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    num_positives = jnp.sum(positives, axis=1)
    per_anchor = -(jnp.sum(jnp.where(positives, log_probabilities, 0.0), axis=1)
                   / jnp.maximum(num_positives, 1))
    return _masked_mean(per_anchor, num_positives > 0)


def _no_params(rng, num_classes, embedding_dim, config):
    return {}


LOSSES = {
    "softmax": Loss(_init_linear_classifier, _softmax_loss),
    "normalized_softmax": Loss(_init_proxies, _normalized_softmax_loss, {
        # logits = scale * cosine to the class proxy (temperature 1 / scale)
        "normalized_softmax_scale": LossOption(16.0),
    }),
    "arcface": Loss(_init_proxies, _arcface_loss, {
        "arcface_scale": LossOption(30.0),
        # radians added to the angle to the true class's proxy
        "arcface_margin": LossOption(0.2, "in [0, pi/2)"),
    }),
    "contrastive": Loss(_no_params, _contrastive_loss, {
        # negatives are pushed below this similarity
        "contrastive_margin": LossOption(0.5, "of 0 or more"),
    }),
    "triplet": Loss(_no_params, _triplet_loss, {
        # the hardest negative must sit this far below the hardest positive
        "triplet_margin": LossOption(0.2, "of 0 or more"),
    }),
    "multi_similarity": Loss(_no_params, _multi_similarity_loss, {
        "multi_similarity_alpha": LossOption(2.0),  # weight of positive pairs
        "multi_similarity_beta": LossOption(50.0),  # weight of negative pairs
        # similarity threshold of the soft weighting
        "multi_similarity_lambda": LossOption(0.5, "of any size"),
        "multi_similarity_epsilon": LossOption(0.1, "of 0 or more"),  # pair-mining margin
    }),
    "supcon": Loss(_no_params, _supcon_loss, {
        "supcon_temperature": LossOption(0.1),
    }),
}

# Every key a loss reads from `config.loss_options`, across all losses.
LOSS_OPTIONS = {key: option for loss in LOSSES.values() for key, option in loss.options.items()}
DEFAULT_LOSS_OPTIONS = {key: option.default for key, option in LOSS_OPTIONS.items()}


def check_loss_options(options) -> None:
    """Raises JaxRetrievalError on an unknown key or a value outside its option's range."""
    for key, value in options.items():
        if key not in LOSS_OPTIONS:
            raise JaxRetrievalError(
                f"bad config: loss_options.{key} is no loss option; use one of "
                f"{', '.join(LOSS_OPTIONS)}")
        valid = LOSS_OPTIONS[key].valid
        if not OPTION_RANGES[valid](value):
            raise JaxRetrievalError(
                f"bad config: loss_options.{key}={value}; use a value {valid}")


def _sum_of(names):
    """The sum of the named losses, each with its own learned parameters under its name."""
    terms = [(name, LOSSES[name]) for name in names]

    def init(rng, num_classes, embedding_dim, config):
        rngs = jax.random.split(rng, len(terms))
        return {name: loss.init(term_rng, num_classes, embedding_dim, config)
                for (name, loss), term_rng in zip(terms, rngs)}

    def apply(params, embeddings, labels, config):
        return sum(loss.apply(params[name], embeddings, labels, config)
                   for name, loss in terms)

    return Loss(init, apply)


def with_projection_head(loss: Loss, hidden: int) -> Loss:
    """`loss` scored on an MLP projection of the embeddings, which retrieval never sees.

    The head (Dense(hidden), ReLU, Dense back to the embedding size, unit length) is
    learned with the loss, under "head" in its parameters, so the embedding need not
    shed what the training classes do not use: the head SimCLR and SupCon train through,
    reported to transfer supervised features better (Wang et al., 2022).
    """
    def init(rng, num_classes, embedding_dim, config):
        loss_rng, hidden_rng, out_rng = jax.random.split(rng, 3)
        dense = jax.nn.initializers.lecun_normal()
        head = {"hidden": {"kernel": dense(hidden_rng, (embedding_dim, hidden), jnp.float32),
                           "bias": jnp.zeros((hidden,), jnp.float32)},
                "out": {"kernel": dense(out_rng, (hidden, embedding_dim), jnp.float32),
                        "bias": jnp.zeros((embedding_dim,), jnp.float32)}}
        return {"head": head, "loss": loss.init(loss_rng, num_classes, embedding_dim, config)}

    def apply(params, embeddings, labels, config):
        head = params["head"]
        x = jnp.asarray(embeddings, jnp.float32)
        x = jax.nn.relu(x @ head["hidden"]["kernel"] + head["hidden"]["bias"])
        x = _unit_rows(x @ head["out"]["kernel"] + head["out"]["bias"])
        return loss.apply(params["loss"], x, labels, config)

    return Loss(init, apply)


def get_loss(name: str) -> Loss:
    """The loss called `name`: a registered one, or several joined by "+" (their sum).

    A sum such as "softmax+multi_similarity" pairs a classification loss with a pair
    loss, the usual recipe in re-identification; each term keeps its own options and
    learned parameters. Raises JaxRetrievalError naming the known losses.
    """
    names = str(name).split("+")
    unknown = [part for part in names if part not in LOSSES]
    if unknown or len(set(names)) != len(names):
        problem = (f"unknown loss {unknown[0]!r}" if unknown
                   else f"loss {name!r} names a term twice")
        raise JaxRetrievalError(
            f"{problem}; use one of {', '.join(LOSSES)}, or several joined by '+' "
            "(e.g. softmax+multi_similarity)")
    return LOSSES[name] if len(names) == 1 else _sum_of(names)
