"""Compression (jaxretrieval.compress): the methods' guarantees on small models, and the
compressed workdirs that load and search like any other."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from jaxretrieval import cli
from jaxretrieval.compress import METHODS, compress_workdir, get_method
from jaxretrieval.compress.base import weight_paths
from jaxretrieval.compress.channels import (channel_groups, kept_channels, mask_channels,
                                            prune_channels, pruned_config)
from jaxretrieval.compress.prune import (gradual_pruning, kernel_sparsity, mask_schedule,
                                         sparsity_at)
from jaxretrieval.compress.share import (clustered, distinct_values, pack_kernel,
                                         shared_gradients, unpack_kernel)
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import build_model
from jaxretrieval.retriever import Retriever


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("method, options, says", [
    ("prune", {"sparsity": 1.0}, "sparsity=1.0 is not valid; use a number in [0, 1)"),
    ("prune", {"scope": "net"}, "scope='net' is not valid; use one of global, layer"),
    ("share", {"bits": 9}, "bits=9 is not valid; use an integer in [2, 8]"),
    ("share", {"bits": 2.5}, "bits=2.5 is not valid"),
    ("share", {"bits": float("inf")}, "bits=inf is not valid; use an integer in [2, 8]"),
    ("share", {"bits": float("nan")}, "bits=nan is not valid; use an integer in [2, 8]"),
    ("share", {"bits": np.float32("inf")}, "is not valid; use an integer in [2, 8]"),
    ("prune", {"sparsity": float("nan")}, "sparsity=nan is not valid"),
    ("channels", {"keep": 0}, "keep=0 is not valid; use a number in (0, 1]"),
    ("channels", {"steps": -1}, "steps=-1 is not valid"),
    ("channels", {"sparsity": 0.5}, "takes no option 'sparsity'; its options are keep, "),
])
def test_a_bad_option_is_refused_naming_it_and_its_range(method, options, says):
    with pytest.raises(JaxRetrievalError, match="compress --method " + method) as err:
        get_method(method).checked_options(options)
    assert says in str(err.value)


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(JaxRetrievalError, match="use one of prune, channels, share"):
        get_method("quantum")


# ---------------------------------------------------------------- pruning


def test_the_pruning_mask_keeps_the_requested_sparsity_through_training():
    rng = np.random.default_rng(0)
    params = {"model": {"a": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},
                        "b": {"kernel": rng.normal(size=(8, 16)).astype(np.float32),
                              "bias": np.ones(16, np.float32)}}}
    targets = ["model/a/kernel", "model/b/kernel"]
    steps, target = 40, 0.75
    ramp, every = mask_schedule(steps)
    optimizer = optax.chain(optax.adam(0.05), gradual_pruning(targets, target, "global", steps))
    state = optimizer.init(params)

    @jax.jit
    def step_fn(params, state):
        # Gradients that push every weight, pruned or not, away from zero.
        grads = jax.tree.map(lambda p: -jnp.sign(p) - 1.0, params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    zeros_before = [np.zeros((3, 3, 4, 8), bool), np.zeros((8, 16), bool)]
    for step in range(1, steps + 1):
        params, state = step_fn(params, state)
        zeros = [np.asarray(params["model"][k]["kernel"]) == 0 for k in ("a", "b")]
        # A pruned weight stays pruned, whatever its gradient says.
        assert all(np.all(z[w]) for z, w in zip(zeros, zeros_before))
        last_update = min(step // every * every, ramp)
        wanted = float(sparsity_at(last_update, target, ramp))
        assert abs(kernel_sparsity(params["model"]) - wanted) < 0.01, step
        if step % every and step != ramp:  # between mask updates: the same zeros exactly
            assert all(np.array_equal(z, w) for z, w in zip(zeros, zeros_before))
        zeros_before = zeros
    assert abs(kernel_sparsity(params["model"]) - target) < 0.01
    assert np.all(np.asarray(params["model"]["b"]["bias"]) != 0)  # biases are not pruned


def test_layer_scope_prunes_each_kernel_to_the_sparsity():
    rng = np.random.default_rng(1)
    params = {"model": {"a": {"kernel": rng.normal(size=(64, 8)).astype(np.float32) * 10},
                        "b": {"kernel": rng.normal(size=(64, 8)).astype(np.float32)}}}
    optimizer = gradual_pruning(["model/a/kernel", "model/b/kernel"], 0.5, "layer", 4)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for _ in range(4):
        updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
    for name in ("a", "b"):  # a global rank would prune b, the smaller one, far more
        assert np.mean(np.asarray(params["model"][name]["kernel"]) == 0) == 0.5


# ---------------------------------------------------------------- channel pruning


def _random_variables(config, seed=0):
    model = build_model(config)
    x = jnp.zeros((1, config.image_size, config.image_size, config.channels))
    variables = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(seed), x))
    rng = np.random.default_rng(seed)
    # BatchNorm at its initial values would make every channel alike: spread them out
    # (variances stay positive).
    def spread(path, v):
        if v.ndim != 1 or v.size == 1:
            return v
        noise = rng.normal(size=v.shape).astype(v.dtype) * 0.5
        return v * np.exp(noise) if str(path[-1].key) == "var" else v + noise

    return jax.tree_util.tree_map_with_path(spread, variables)


@pytest.mark.parametrize("overrides", [
    {},  # seed CNN with BatchNorm and GeM
    {"model__batch_norm": False, "model__pooling": "flatten", "model__hidden_dim": 12},
    {"model__name": "resnet18", "model__num_filters": 4, "model__pooling": "avg"},
], ids=["seed_cnn_bn_gem", "seed_cnn_flatten_hidden", "resnet18"])
def test_channel_pruning_computes_what_masking_those_channels_computes(overrides):
    config = tiny_config("", **overrides)
    variables = _random_variables(config)
    groups = channel_groups(config, variables)
    kept = kept_channels(groups, 0.5)
    small_config = pruned_config(config, groups, kept)
    small = prune_channels(variables, groups, kept)
    images = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 1))
    pruned_out = jax.jit(build_model(small_config).apply)(small, images)
    full_model = jax.jit(build_model(config).apply)
    masked_out = full_model(mask_channels(variables, groups, kept), images)
    full_out = full_model(variables, images)
    np.testing.assert_allclose(pruned_out, masked_out, atol=2e-5)
    assert not np.allclose(pruned_out, full_out, atol=1e-3)  # channels did go
    smaller = sum(np.size(x) for x in jax.tree.leaves(small))
    assert smaller < 0.6 * sum(np.size(x) for x in jax.tree.leaves(variables))


def test_channel_pruning_refuses_a_model_it_cannot_rewrite():
    config = tiny_config("", model__name="dlib_face_resnet")
    with pytest.raises(JaxRetrievalError, match="rewrites seed_cnn and resnet models"):
        get_method("channels").check_source(config)


# ---------------------------------------------------------------- weight sharing


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_a_shared_kernel_holds_at_most_two_to_the_bits_values_and_packs_exactly(bits):
    rng = np.random.default_rng(bits)
    params = {"conv": {"kernel": rng.normal(size=(3, 3, 8, 16)).astype(np.float32),
                       "bias": rng.normal(size=16).astype(np.float32)}}
    shared, indices = clustered(params, bits)
    assert distinct_values(shared)["conv/kernel"] <= 2 ** bits
    packed = pack_kernel(shared["conv"]["kernel"], bits)
    assert packed["indices"].nbytes == -(-3 * 3 * 8 * 16 * bits // 8)
    np.testing.assert_array_equal(unpack_kernel(packed, bits), shared["conv"]["kernel"])
    np.testing.assert_array_equal(shared["conv"]["bias"], params["conv"]["bias"])


@pytest.mark.parametrize("bits", range(2, 9))
def test_tiny_kernels_round_trip_at_every_width(bits):
    # A few weights, where the packed bytes' padding bits may outnumber the weights.
    share = get_method("share")
    options = share.checked_options({"bits": bits})
    rng = np.random.default_rng(bits)
    for size in range(1, 10):
        kernel = rng.integers(0, 2 ** bits, size=(size, 1)).astype(np.float32)
        variables = {"params": {"dense": {"kernel": kernel}}, "batch_stats": {}}
        restored = share.unpack(share.pack(variables, options), options)
        np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], kernel)


def test_shared_weights_stay_shared_through_fine_tuning():
    rng = np.random.default_rng(0)
    params = {"model": {"dense": {"kernel": rng.normal(size=(32, 8)).astype(np.float32)}}}
    shared, indices = clustered(params["model"], 2)
    params = {"model": shared}
    optimizer = optax.chain(shared_gradients({"model/" + k: v for k, v in indices.items()}),
                            optax.adamw(0.01, weight_decay=1e-3))
    state = optimizer.init(params)
    before = np.asarray(params["model"]["dense"]["kernel"]).copy()
    for step in range(5):
        grads = jax.tree.map(
            lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    after = np.asarray(params["model"]["dense"]["kernel"])
    assert len(np.unique(after)) <= 4
    assert not np.array_equal(after, before)  # the centroids did move


# ---------------------------------------------------------------- fine-tuning


def test_fine_tuning_does_not_freeze_the_backbone_again(data_dir, monkeypatch):
    # The source run froze its backbone for its first steps only; fine-tuning starts
    # its own step count at 0, so it must not take those steps over.
    from jaxretrieval.compress import finetune

    built = []

    def stop(config):
        built.append(config)
        raise RuntimeError("optimizer built")

    monkeypatch.setattr(finetune, "make_optimizer", stop)
    config = tiny_config(data_dir, frozen_backbone_steps=200)
    fine_tune = finetune.fine_tuner(None, None, {}, first_step=8)
    with pytest.raises(RuntimeError, match="optimizer built"):
        fine_tune(config, {}, steps=4, learning_rate=1e-3)
    assert built[0].frozen_backbone_steps == 0
    assert built[0].num_train_steps == 4
    assert config.frozen_backbone_steps == 200  # the source's config is not changed


# ---------------------------------------------------------------- compressed workdirs

FAST = {"prune": {"sparsity": 0.5, "steps": 4}, "channels": {"keep": 0.5, "steps": 2},
        "share": {"bits": 3, "steps": 2}, "int8": {"calibration_images": 64}}


@pytest.fixture(scope="module")
def compressed(trained_workdir, tmp_path_factory):
    """Every method's compressed workdir of the session's trained run."""
    source, _ = trained_workdir
    root = tmp_path_factory.mktemp("compressed")
    return {name: (str(root / name), compress_workdir(source, str(root / name), name,
                                                      FAST[name]))
            for name in METHODS}


@pytest.mark.parametrize("method", list(FAST))
def test_a_compressed_workdir_loads_and_searches(method, compressed, trained_workdir):
    workdir, record = compressed[method]
    with open(os.path.join(trained_workdir[0], "metrics.json")) as f:
        assert set(json.load(f)) == set(record["metrics"])
    retriever = Retriever.load(workdir)
    try:
        entry = retriever.index.manifest["compression"]
        assert entry["method"] == method
        assert entry["options"] == get_method(method).checked_options(FAST[method])
        assert 0 < entry["model_bytes"] < entry["source_model_bytes"]
        keys, scores = retriever.search([retriever.item_input(retriever.index.keys[0])], k=3)
        assert keys[0][0] == retriever.index.keys[0] and scores[0][0] > 0.99
        params = retriever.embedder.variables["params"]
        if method == "prune":
            assert abs(kernel_sparsity(params) - 0.5) < 0.01
        if method == "share":
            assert max(distinct_values(jax.device_get(params)).values()) <= 8
    finally:
        retriever.close()
    assert not any(name.startswith(".") for name in os.listdir(os.path.dirname(workdir)))


def test_the_compress_command_writes_a_workdir_and_refuses_a_used_output(
        trained_workdir, compressed, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    output = tmp_path / "cli"
    argv = ["compress", "--workdir", trained_workdir[0], "--method", "channels",
            "--keep", "0.75", "--steps", "0", "--output", str(output)]
    assert cli.main(argv) == 0
    assert "map@r" in capsys.readouterr().out
    with open(output / "compression.json") as f:
        assert json.load(f)["facts"]["widths"] == {"Conv_0": 6, "Conv_1": 12}
    assert cli.main(argv) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main(argv[:-2] + ["--bits", "3", "--output", str(tmp_path / "other")]) == 1
    assert "--bits is an option of --method share, not of channels" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "other")


def test_a_failed_compression_leaves_no_workdir(trained_workdir, tmp_path, monkeypatch):
    from jaxretrieval.compress import run

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(run, "evaluate_and_index", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        compress_workdir(trained_workdir[0], str(tmp_path / "out"), "prune", {"steps": 0})
    assert os.listdir(tmp_path) == []


def test_two_compressions_to_one_output_do_not_remove_each_others_files(
        trained_workdir, tmp_path, monkeypatch):
    # The second compression runs to its end while the first is being indexed: the first
    # then finds the output taken and says so, and the second's workdir stays whole.
    from jaxretrieval.compress import run

    output = str(tmp_path / "out")
    index = run.evaluate_and_index
    calls = []

    def index_after_another(workdir, **kwargs):
        calls.append(workdir)
        if len(calls) == 1:
            compress_workdir(trained_workdir[0], output, "prune", {"steps": 0})
        return index(workdir, **kwargs)

    monkeypatch.setattr(run, "evaluate_and_index", index_after_another)
    with pytest.raises(JaxRetrievalError, match="exists and is not empty"):
        compress_workdir(trained_workdir[0], output, "prune", {"steps": 0})
    assert calls[0] != calls[1]
    assert os.listdir(tmp_path) == ["out"]
    retriever = Retriever.load(output)
    try:
        assert retriever.index.manifest["compression"]["method"] == "prune"
    finally:
        retriever.close()


def test_a_compressed_workdir_is_not_compressed_again(compressed, tmp_path):
    with pytest.raises(JaxRetrievalError, match="holds a compressed model already"):
        compress_workdir(compressed["prune"][0], str(tmp_path / "again"), "share")


def test_weight_paths_are_the_conv_and_dense_kernels():
    config = tiny_config("")
    params = _random_variables(config)["params"]
    assert weight_paths(params) == ["backbone/Conv_0/kernel", "backbone/Conv_1/kernel",
                                    "projection/kernel"]


def test_a_compressed_workdir_is_not_trained_further(compressed, data_dir):
    from jaxretrieval.training import train

    with pytest.raises(JaxRetrievalError, match="holds a compressed model"):
        train(tiny_config(data_dir), compressed["share"][0])
