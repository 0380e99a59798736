"""Losses against slow numpy formulations, finite gradients, and the gathered global batch."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxretrieval import losses
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.parallel import DEVICE_AXIS

BATCH, DIM, CLASSES = 12, 8, 4
PAIR_LOSSES = ("contrastive", "triplet", "multi_similarity", "supcon")
PROXY_LOSSES = ("softmax", "normalized_softmax", "arcface")
# Non-default values for every option, to check that apply reads them.
CUSTOM_OPTIONS = {
    "normalized_softmax_scale": 8.0, "arcface_scale": 12.0, "arcface_margin": 0.35,
    "contrastive_margin": 0.3, "triplet_margin": 0.5, "multi_similarity_alpha": 3.0,
    "multi_similarity_beta": 20.0, "multi_similarity_lambda": 0.3,
    "multi_similarity_epsilon": 0.2, "supcon_temperature": 0.5,
}


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def config_with(options=None):
    config = ml_collections.ConfigDict()
    if options is not None:
        config.loss_options = ml_collections.ConfigDict(options)
    return config


def random_batch(seed=0, batch=BATCH):
    rng = np.random.default_rng(seed)
    embeddings = unit_rows(rng.normal(size=(batch, DIM))).astype(np.float32)
    # Class 3 has a single example: an anchor with no positive.
    labels = rng.permutation(np.array([0] * 4 + [1] * 3 + [2] * 4 + [3] * (batch - 11)))
    return embeddings, labels.astype(np.int32)


def random_params(name, seed=1):
    rng = np.random.default_rng(seed)
    if name == "softmax":
        return {"kernel": rng.normal(size=(DIM, CLASSES)).astype(np.float32),
                "bias": rng.normal(size=(CLASSES,)).astype(np.float32)}
    if name in PROXY_LOSSES:
        # Not unit length: the loss must normalise the proxies itself.
        return {"proxies": (2.0 * rng.normal(size=(CLASSES, DIM))).astype(np.float32)}
    return {}


# Slow references in float64, one anchor or pair at a time.

def cross_entropy(logits, labels):
    total = 0.0
    for row, label in zip(logits, labels):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / len(labels)


def reference_softmax(params, e, y, o):
    return cross_entropy(e @ params["kernel"] + params["bias"], y)


def reference_normalized_softmax(params, e, y, o):
    cosines = e @ unit_rows(params["proxies"]).T
    return cross_entropy(o["normalized_softmax_scale"] * cosines, y)


def reference_arcface(params, e, y, o):
    scale, margin = o["arcface_scale"], o["arcface_margin"]
    logits = e @ unit_rows(params["proxies"]).T
    for i, label in enumerate(y):
        cosine = logits[i, label]
        theta = math.acos(min(max(cosine, -1 + 1e-6), 1 - 1e-6))
        if theta + margin <= math.pi:
            logits[i, label] = math.cos(theta + margin)
        else:
            logits[i, label] = cosine - margin * math.sin(margin)
    return cross_entropy(scale * logits, y)


def reference_contrastive(params, e, y, o):
    s, n = e @ e.T, len(y)
    positive_losses, negative_losses = [], []
    for i in range(n):
        for j in range(n):
            if i != j and y[i] == y[j]:
                positive_losses.append(1.0 - s[i, j])
            elif y[i] != y[j] and s[i, j] > o["contrastive_margin"]:
                negative_losses.append(s[i, j] - o["contrastive_margin"])
    mean = lambda values: sum(values) / len(values) if values else 0.0
    return mean(positive_losses) + mean(negative_losses)


def reference_triplet(params, e, y, o):
    s, n = e @ e.T, len(y)
    per_anchor = []
    for a in range(n):
        positives = [s[a, p] for p in range(n) if p != a and y[p] == y[a]]
        negatives = [s[a, k] for k in range(n) if y[k] != y[a]]
        if positives and negatives:
            per_anchor.append(max(0.0, max(negatives) - min(positives) + o["triplet_margin"]))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def reference_multi_similarity(params, e, y, o):
    alpha, beta = o["multi_similarity_alpha"], o["multi_similarity_beta"]
    threshold, epsilon = o["multi_similarity_lambda"], o["multi_similarity_epsilon"]
    s, n = e @ e.T, len(y)
    total = 0.0
    for a in range(n):
        positives = [s[a, p] for p in range(n) if p != a and y[p] == y[a]]
        negatives = [s[a, k] for k in range(n) if y[k] != y[a]]
        if not positives or not negatives:
            continue
        kept_negatives = [v for v in negatives if v + epsilon > min(positives)]
        kept_positives = [v for v in positives if v - epsilon < max(negatives)]
        total += math.log(1 + sum(math.exp(-alpha * (v - threshold))
                                  for v in kept_positives)) / alpha
        total += math.log(1 + sum(math.exp(beta * (v - threshold))
                                  for v in kept_negatives)) / beta
    return total / n


def reference_supcon(params, e, y, o):
    s, n = e @ e.T / o["supcon_temperature"], len(y)
    per_anchor = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and y[p] == y[a]]
        if not positives:
            continue
        denominator = sum(math.exp(s[a, k]) for k in range(n) if k != a)
        per_anchor.append(-sum(math.log(math.exp(s[a, p]) / denominator)
                               for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


REFERENCES = {name: globals()[f"reference_{name}"] for name in losses.LOSSES}


def test_registry_names():
    assert set(losses.LOSSES) == set(PAIR_LOSSES + PROXY_LOSSES)
    assert losses.get_loss("supcon") is losses.LOSSES["supcon"]


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(JaxRetrievalError, match="triplet"):
        losses.get_loss("nope")


def test_sum_of_losses_is_the_sum_with_each_terms_parameters():
    embeddings, labels = random_batch()
    loss = losses.get_loss("softmax+multi_similarity")
    params = loss.init(jax.random.key(0), CLASSES, DIM, config_with())
    assert set(params) == {"softmax", "multi_similarity"}
    assert jax.tree.map(jnp.shape, params["softmax"]) == {"kernel": (DIM, CLASSES),
                                                          "bias": (CLASSES,)}
    params = {"softmax": random_params("softmax"), "multi_similarity": {}}
    value = jax.jit(lambda p, e, y: loss.apply(p, e, y, config_with(CUSTOM_OPTIONS)))(
        params, embeddings, labels)
    options = dict(losses.DEFAULT_LOSS_OPTIONS, **CUSTOM_OPTIONS)
    as_float64 = lambda tree: jax.tree.map(lambda x: x.astype(np.float64), tree)
    expected = sum(REFERENCES[name](as_float64(params[name]), embeddings.astype(np.float64),
                                    labels, options)
                   for name in ("softmax", "multi_similarity"))
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_projection_head_scores_the_loss_on_projected_embeddings():
    embeddings, labels = random_batch()
    hidden = 5
    loss = losses.with_projection_head(losses.get_loss("softmax"), hidden)
    params = loss.init(jax.random.key(0), CLASSES, DIM, config_with())
    assert jax.tree.map(jnp.shape, params) == {
        "head": {"hidden": {"kernel": (DIM, hidden), "bias": (hidden,)},
                 "out": {"kernel": (hidden, DIM), "bias": (DIM,)}},
        "loss": {"kernel": (DIM, CLASSES), "bias": (CLASSES,)}}
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)

    value, (param_grads, embedding_grads) = jax.jit(jax.value_and_grad(
        lambda p, e: loss.apply(p, e, labels, config_with()), argnums=(0, 1)))(
            params, embeddings)

    head = jax.tree.map(lambda x: x.astype(np.float64), params["head"])
    hidden_out = np.maximum(embeddings @ head["hidden"]["kernel"] + head["hidden"]["bias"], 0)
    projected = unit_rows(hidden_out @ head["out"]["kernel"] + head["out"]["bias"])
    expected = reference_softmax(jax.tree.map(lambda x: x.astype(np.float64), params["loss"]),
                                 projected, labels, losses.DEFAULT_LOSS_OPTIONS)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    # The head learns, and the embedding is trained through it.
    assert np.abs(param_grads["head"]["hidden"]["kernel"]).max() > 0
    assert np.abs(embedding_grads).max() > 0


@pytest.mark.parametrize("name, problem", [("softmax+nope", "unknown loss 'nope'"),
                                           ("triplet+triplet", "names a term twice"),
                                           ("softmax+", "unknown loss ''")])
def test_bad_sum_of_losses_says_what_to_use(name, problem):
    with pytest.raises(JaxRetrievalError, match=problem) as error:
        losses.get_loss(name)
    assert "softmax+multi_similarity" in str(error.value)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_init_shapes(name):
    params = losses.get_loss(name).init(jax.random.key(0), CLASSES, DIM, config_with())
    shapes = jax.tree.map(jnp.shape, params)
    expected = {"softmax": {"kernel": (DIM, CLASSES), "bias": (CLASSES,)},
                "normalized_softmax": {"proxies": (CLASSES, DIM)},
                "arcface": {"proxies": (CLASSES, DIM)}}.get(name, {})
    assert shapes == expected


@pytest.mark.parametrize("options", [None, CUSTOM_OPTIONS], ids=["defaults", "custom"])
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_matches_numpy_reference(name, options):
    embeddings, labels = random_batch()
    params = random_params(name)
    loss = losses.get_loss(name)
    value = jax.jit(lambda p, e, y: loss.apply(p, e, y, config_with(options)))(
        params, embeddings, labels)
    expected = REFERENCES[name](
        jax.tree.map(lambda x: x.astype(np.float64), params), embeddings.astype(np.float64),
        labels, dict(losses.DEFAULT_LOSS_OPTIONS, **(options or {})))
    assert value.shape == () and value.dtype == jnp.float32
    assert expected > 0.01  # the batch really exercises the loss
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_arcface_reference_covers_the_far_side_branch():
    # An example facing away from its proxy takes the linear branch past theta = pi - m.
    params = random_params("arcface")
    proxies = unit_rows(params["proxies"].astype(np.float64))
    embeddings = np.stack([-proxies[0], proxies[1]]).astype(np.float32)
    labels = np.array([0, 1], np.int32)
    value = jax.jit(lambda p, e, y: losses.get_loss("arcface").apply(p, e, y, config_with()))(
        params, embeddings, labels)
    expected = reference_arcface(params, embeddings.astype(np.float64), labels,
                                 losses.DEFAULT_LOSS_OPTIONS)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def degenerate_batches():
    """(what, embeddings, labels) for batches where masks, ties and clips matter."""
    embeddings, labels = random_batch(seed=3)
    # A basis vector, so that similarities (and cosines to equal proxies) are exactly 1.
    same = np.tile(np.eye(DIM, dtype=np.float32)[:1], (BATCH, 1))
    return [
        ("random", embeddings, labels),
        ("identical embeddings", same, labels),
        ("identical embeddings, one class", same, np.zeros(BATCH, np.int32)),
        ("one class", embeddings, np.zeros(BATCH, np.int32)),
        ("no positives", embeddings[:CLASSES], np.arange(CLASSES, dtype=np.int32)),
        ("single example", embeddings[:1], labels[:1]),
    ]


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_gradients_are_finite(name):
    loss = losses.get_loss(name)
    grad = jax.jit(jax.value_and_grad(lambda p, e, y: loss.apply(p, e, y, config_with()),
                                      argnums=(0, 1)))
    for what, embeddings, labels in degenerate_batches():
        params = random_params(name)
        if "proxies" in params and what.startswith("identical"):
            # Proxies equal to the embedding: cos(theta) = 1, where sin(theta) has no gradient.
            params = {"proxies": np.tile(embeddings[:1], (CLASSES, 1))}
        value, grads = grad(params, embeddings, labels)
        assert np.isfinite(value), (what, value)
        for leaf in jax.tree.leaves(grads):
            assert np.all(np.isfinite(leaf)), (what, leaf)


# The gathered global batch: pmap over 4 devices equals one device on the whole batch.

NUM_DEVICES, PER_DEVICE, INPUT_DIM = 4, 4, 6


def gathered_case(name):
    rng = np.random.default_rng(7)
    inputs = rng.normal(size=(NUM_DEVICES * PER_DEVICE, INPUT_DIM)).astype(np.float32)
    # Each device holds one example of each class: every positive lives on another device.
    labels = np.tile(np.arange(CLASSES, dtype=np.int32), NUM_DEVICES)
    params = {"model": rng.normal(size=(INPUT_DIM, DIM)).astype(np.float32),
              "loss": random_params(name)}
    return params, inputs, labels


def model_loss(loss, params, inputs, labels, gather):
    embeddings = inputs @ params["model"]
    embeddings = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
    if gather:
        embeddings, labels = losses.gather_batch(embeddings, labels, DEVICE_AXIS)
    return loss.apply(params["loss"], embeddings, labels, config_with())


def per_device_step(loss):
    def step(params, inputs, labels):
        value, grads = jax.value_and_grad(model_loss, argnums=1)(
            loss, params, inputs, labels, True)
        return value, jax.lax.pmean(grads, DEVICE_AXIS)
    return step


def assert_every_device_matches_one_device(loss, params, inputs, labels, values, grads):
    expected_value, expected_grads = jax.jit(jax.value_and_grad(
        lambda p: model_loss(loss, p, inputs, labels, False)))(params)
    assert expected_value > 0.01
    for device in range(NUM_DEVICES):
        np.testing.assert_allclose(values[device], expected_value, atol=1e-5, rtol=1e-5)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
            assert np.abs(want).max() > 1e-4  # a gradient of zero would prove nothing
            np.testing.assert_allclose(got[device], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PAIR_LOSSES + ("arcface",))
def test_gathered_batch_under_pmap_equals_one_device(name):
    assert jax.local_device_count() >= NUM_DEVICES
    loss = losses.get_loss(name)
    params, inputs, labels = gathered_case(name)
    replicated = jax.tree.map(lambda x: np.broadcast_to(x, (NUM_DEVICES,) + x.shape), params)
    split = lambda x: x.reshape((NUM_DEVICES, PER_DEVICE) + x.shape[1:])
    step = jax.pmap(per_device_step(loss), axis_name=DEVICE_AXIS,
                    devices=jax.local_devices()[:NUM_DEVICES])
    values, grads = step(replicated, split(inputs), split(labels))
    assert_every_device_matches_one_device(loss, params, inputs, labels, values, grads)


def test_gathered_batch_under_shard_map_equals_one_device():
    # The trainer's other wrapper: replicated-in-value params carried with a device axis.
    from jax.sharding import PartitionSpec

    from jaxretrieval.parallel import device_mesh

    loss = losses.get_loss("supcon")
    params, inputs, labels = gathered_case("supcon")
    replicated = jax.tree.map(lambda x: np.broadcast_to(x, (NUM_DEVICES,) + x.shape), params)
    step = per_device_step(loss)

    def per_shard(params, inputs, labels):
        value, grads = step(jax.tree.map(lambda x: x[0], params), inputs, labels)
        return value[None], jax.tree.map(lambda g: g[None], grads)

    spec = PartitionSpec(DEVICE_AXIS)
    mapped = jax.jit(jax.shard_map(per_shard, mesh=device_mesh(jax.local_devices()[:NUM_DEVICES]),
                                   in_specs=(spec, spec, spec), out_specs=(spec, spec)))
    values, grads = mapped(replicated, inputs, labels)
    assert_every_device_matches_one_device(loss, params, inputs, labels, values, grads)


def test_a_loss_option_set_on_the_command_line_reaches_the_loss():
    from jaxretrieval.config import apply_override, base_config, validate_config

    embeddings, labels = random_batch()
    config = base_config()
    apply_override(config, "loss_options.triplet_margin", "0.7")
    validate_config(config)
    value = losses.get_loss("triplet").apply({}, embeddings, labels, config)
    expected = reference_triplet({}, embeddings.astype(np.float64), labels,
                                 dict(losses.DEFAULT_LOSS_OPTIONS, triplet_margin=0.7))
    default = reference_triplet({}, embeddings.astype(np.float64), labels,
                                losses.DEFAULT_LOSS_OPTIONS)
    assert abs(expected - default) > 0.1  # the override changes the value
    np.testing.assert_allclose(value, expected, rtol=1e-5)


class RecordingOptions(dict):
    """Loss options that remember which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_a_loss_reads_exactly_the_options_it_declares_and_its_defaults_are_valid(name):
    loss = losses.LOSSES[name]
    options = RecordingOptions({key: option.default for key, option in loss.options.items()})
    losses.check_loss_options(options)
    embeddings, labels = random_batch()
    assert np.isfinite(loss.apply(random_params(name), embeddings, labels,
                                  {"loss_options": options}))
    assert options.read == set(loss.options)


@pytest.mark.parametrize("options, message", [
    ({"triplet_margins": 0.2}, "loss_options.triplet_margins is no loss option; use one of "
                               ".*triplet_margin"),
    ({"supcon_temperature": 0.0}, r"supcon_temperature=0.0; use a value above 0"),
    ({"arcface_margin": 2.0}, r"arcface_margin=2.0; use a value in \[0, pi/2\)"),
    ({"contrastive_margin": -0.1}, r"contrastive_margin=-0.1; use a value of 0 or more"),
])
def test_bad_loss_options_are_refused_saying_what_to_use(options, message):
    with pytest.raises(JaxRetrievalError, match=message):
        losses.check_loss_options(options)
