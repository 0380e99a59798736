"""Starting from a pretrained file (models/pretrained.py) and the fine-tuning controls.

Most tests register a small test-only format ("npz": a .npz of the model's arrays, which
also names the keys it decides) so that the mechanism runs on tiny digit models in seconds.
The dlib tests read the real face network; they skip without dlib and the
face-recognition-models files, and fail instead when JAXRETRIEVAL_REQUIRE_FACES is set.
"""

import functools
import importlib.util
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from conftest import YALEFACES, tiny_config
from jaxretrieval import parallel
from jaxretrieval.checkpoint import CheckpointStore, latest_checkpoint_step
from jaxretrieval.config import (RUN_KEYS, config_from_json, config_to_json, model_config_hash,
                                 validate_config)
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import INPUT_NORMS, build_model
from jaxretrieval.models.pretrained import (FORMATS, PretrainedFormat, configured_for_init,
                                            find_format, initial_variables, read_head)
from jaxretrieval.training import build_training, make_optimizer, train, train_and_evaluate
from jaxretrieval.workdir import Workdir

HAVE_FACES = (importlib.util.find_spec("dlib") is not None
              and importlib.util.find_spec("face_recognition_models") is not None)
needs_faces = pytest.mark.skipif(
    not HAVE_FACES and not os.environ.get("JAXRETRIEVAL_REQUIRE_FACES"),
    reason='dlib and face-recognition-models are not installed (pip install -e ".[faces]")')

# The start of a dlib network file: version 1, then the loss layer's record name; it ends
# there, as a truncated download would.
DLIB_START = b"\x01\x01\x01\x0dloss_metric_2\x03\x0a"


# ---------------------------------------------------------------- a test-only format

def save_npz(path, variables, decided=None):
    """Writes `variables` ({"params": ..., "batch_stats": ...}) as a test-format file."""
    flat = {"/".join(str(getattr(k, "key", k)) for k in key_path): np.asarray(leaf)
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    np.savez(path, decided=json.dumps(decided or {}), **flat)
    return str(path)


def read_npz(path):
    tree = {"params": {}, "batch_stats": {}}
    with np.load(path) as f:
        for name in f.files:
            if name == "decided":
                continue
            *parents, leaf = name.split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = f[name]
    return tree


def npz_decided(path):
    with np.load(path) as f:
        return json.loads(str(f["decided"]))


@pytest.fixture
def npz_format(monkeypatch):
    """Registers the "npz" format; returns the list of paths its load was called with."""
    loads = []

    def load(path, config):
        loads.append(path)
        return read_npz(path)

    monkeypatch.setitem(FORMATS, "npz", PretrainedFormat(
        sniff=lambda path: read_head(path, 4) == b"PK\x03\x04", decided_keys=npz_decided,
        load=load))
    return loads


def fresh_variables(config):
    """The model's freshly initialised variables, as numpy arrays the caller may change."""
    model_keys = {key: config[key] for key in ("image_size", "channels", "embedding_dim", "seed")}
    model_keys["model"] = config.model.to_dict()
    return jax.tree.map(np.copy, initialised(json.dumps(model_keys, default=list)))


@functools.lru_cache(maxsize=None)
def initialised(model_keys_json):
    # Compiling a convolution's initialisation takes seconds on a CPU: once per model.
    config = config_from_json(model_keys_json)
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.channels))
    return jax.jit(build_model(config).init)(jax.random.PRNGKey(config.seed), dummy)


def scrambled(variables, seed):
    """The same shapes, other values: what another training run would have left."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), variables)


# ---------------------------------------------------------------- finding the format

def test_find_format_names_the_formats_for_a_missing_or_unknown_file(tmp_path):
    with pytest.raises(JaxRetrievalError, match=r"no such file.*formats: dlib"):
        find_format(str(tmp_path / "missing.pt"))
    unknown = tmp_path / "notes.txt"
    unknown.write_text("not weights\n")
    with pytest.raises(JaxRetrievalError, match=r"in no format this package reads \(known "
                                                r"formats: dlib"):
        find_format(str(unknown))
    with pytest.raises(JaxRetrievalError, match="init_format='caffe' is not a known format"):
        find_format(str(unknown), "caffe")
    assert find_format(str(unknown), "dlib") == "dlib"  # forced: the load will judge it
    png = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(JaxRetrievalError, match="in no format"):
        find_format(str(png))


def test_a_file_two_formats_claim_asks_for_init_format(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    for name in ("alpha", "beta"):
        monkeypatch.setitem(FORMATS, name, PretrainedFormat(
            sniff=lambda p: True, decided_keys=lambda p: {}, load=lambda p, c: {}))
    with pytest.raises(JaxRetrievalError,
                       match=r"any of the formats alpha, beta; choose one with "
                             r"--config.init_format=alpha"):
        find_format(str(path))
    assert find_format(str(path), "beta") == "beta"


def test_a_truncated_dlib_file_is_recognised_and_refused_at_loading(tmp_path, data_dir):
    path = tmp_path / "cut.dat"
    path.write_bytes(DLIB_START)
    assert find_format(str(path)) == "dlib"
    config = tiny_config(data_dir, init_from=str(path))
    with pytest.raises(JaxRetrievalError, match=r"the file ends inside .*is it truncated\?"):
        initial_variables(config, {})


# ---------------------------------------------------------------- decided keys and loading

def test_the_keys_a_file_decides_are_set_and_each_change_logged(tmp_path, data_dir,
                                                                 npz_format, caplog):
    config = tiny_config(data_dir)
    path = save_npz(tmp_path / "w.npz", fresh_variables(config),
                    decided={"model.pooling": "avg", "embedding_dim": 16,
                             "model.widths": [8, 16]})
    config.init_from = path
    with caplog.at_level(logging.INFO, logger="jaxretrieval.models.pretrained"):
        configured = configured_for_init(config)
    assert configured.model.pooling == "avg" and config.model.pooling == "gem"  # a copy
    assert configured.model.widths == (8, 16)
    changes = [r.getMessage() for r in caplog.records if "init_from sets" in r.getMessage()]
    assert changes == ["init_from sets model.pooling: gem -> avg"]  # unchanged keys are quiet
    assert configured_for_init(tiny_config(data_dir)).init_from == ""  # no file: as it was


def test_the_file_fills_what_it_holds_and_the_rest_starts_fresh(tmp_path, data_dir,
                                                                 npz_format):
    config = tiny_config(data_dir, model__pooling="avg")
    fresh = fresh_variables(config)
    other = scrambled(fresh, 1)
    backbone_only = {"params": {"backbone": other["params"]["backbone"]},
                     "batch_stats": other["batch_stats"]}
    config.init_from = save_npz(tmp_path / "w.npz", backbone_only)
    loaded = initial_variables(config, fresh)
    for a, b in zip(jax.tree.leaves(loaded["params"]["backbone"]),
                    jax.tree.leaves(other["params"]["backbone"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(loaded["batch_stats"]), jax.tree.leaves(other["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(loaded["params"]["projection"]),
                    jax.tree.leaves(fresh["params"]["projection"])):
        np.testing.assert_array_equal(a, b)
    # The fresh tree the caller passed is left as it was.
    assert not np.array_equal(fresh["params"]["backbone"]["Conv_0"]["kernel"],
                              loaded["params"]["backbone"]["Conv_0"]["kernel"])


def test_a_file_that_does_not_fit_names_the_parameter_and_both_shapes(tmp_path, data_dir,
                                                                      npz_format):
    config = tiny_config(data_dir)
    config.init_from = save_npz(tmp_path / "w.npz", fresh_variables(config))
    config.channels = 3  # the first convolution alone changes shape
    with pytest.raises(JaxRetrievalError) as error:
        initial_variables(config, fresh_variables(config))
    message = str(error.value)
    assert "params/backbone/Conv_0/kernel has shape (3, 3, 1, 8) in the file" in message
    assert "the model expects (3, 3, 3, 8)" in message

    extra = fresh_variables(tiny_config(data_dir))
    extra["params"]["backbone"]["Conv_9"] = {"kernel": np.zeros((3, 3, 1, 1), np.float32)}
    config = tiny_config(data_dir, init_from=save_npz(tmp_path / "x.npz", extra))
    with pytest.raises(JaxRetrievalError, match=r"holds params/backbone/Conv_9/kernel, which "
                                                r"model.name=seed_cnn does not have"):
        initial_variables(config, fresh_variables(config))


# ---------------------------------------------------------------- the fine-tuning controls

def params_after_steps(config, steps, seed=0):
    """The host train states before and after each of `steps` steps on one fixed batch."""
    devices = jax.local_devices()
    training = build_training(config, devices, num_classes=10)
    state = parallel.replicate(training.initial_state, devices)
    rng = np.random.default_rng(seed)
    batch = {"images": rng.integers(0, 256, (config.global_batch_size, 16, 16, 1), np.uint8),
             "labels": (np.arange(config.global_batch_size) % 10).astype(np.int32)}
    states = [training.initial_state]
    for _ in range(steps):
        state, _ = training.step(state, parallel.shard_batch(batch, devices))
        states.append(parallel.unreplicate(state))
    return states


def change(before, after, part):
    """The update of the model's `part` ("backbone" or "projection") as one flat vector."""
    return np.concatenate([np.ravel(b - a) for a, b in zip(
        jax.tree.leaves(before.params["model"][part]),
        jax.tree.leaves(after.params["model"][part]))])


def optimizer_updates(config, steps):
    """The optimiser's updates of toy_params over `steps` steps of fixed random gradients."""
    optimizer, _ = make_optimizer(config)
    params = toy_params()
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    state, out = optimizer.init(params), []
    for _ in range(steps):
        updates, state = optimizer.update(grads, state, params)
        out.append(updates)
    return out


def test_the_backbone_multiplier_scales_the_backbones_update_alone(data_dir):
    # No warm-up: the schedule's first step is the peak, so the first update is not zero.
    updates = {m: optimizer_updates(tiny_config(data_dir, warmup_steps=0,
                                                backbone_lr_multiplier=m), 1)[0]
               for m in (1.0, 0.5, 0.0)}
    for part in ("backbone", "projection"):
        for m in (0.5, 0.0):
            scale = m if part == "backbone" else 1.0  # the head learns at the full rate
            for a, b in zip(jax.tree.leaves(updates[m]["model"][part]),
                            jax.tree.leaves(updates[1.0]["model"][part])):
                np.testing.assert_allclose(a, scale * b, rtol=1e-6, atol=0)
    full = jax.tree.leaves(updates[1.0]["model"]["backbone"])
    assert all(np.abs(leaf).min() > 1e-4 for leaf in full)  # the comparison means something
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(updates[0.0]["model"]["backbone"]))
    np.testing.assert_allclose(updates[0.0]["loss"]["proxies"], updates[1.0]["loss"]["proxies"])


def test_the_backbone_is_frozen_for_its_first_steps_then_trains_at_its_rate(data_dir):
    frozen = optimizer_updates(tiny_config(data_dir, warmup_steps=0, frozen_backbone_steps=2,
                                           backbone_lr_multiplier=0.5), 3)
    free = optimizer_updates(tiny_config(data_dir, warmup_steps=0,
                                         backbone_lr_multiplier=0.5), 3)
    for step in range(3):
        for part in ("backbone", "projection"):
            for a, b in zip(jax.tree.leaves(frozen[step]["model"][part]),
                            jax.tree.leaves(free[step]["model"][part])):
                # Adam's moments follow the gradients through the frozen steps, so the
                # first free step is the step an unfrozen run takes there.
                expected = 0 * b if part == "backbone" and step < 2 else b
                np.testing.assert_allclose(a, expected, rtol=1e-6, atol=0)


def test_a_run_with_a_frozen_warm_up_moves_the_head_first_then_the_backbone(data_dir):
    """The fine-tuning keys reach the compiled step; BatchNorm statistics move as usual."""
    states = params_after_steps(tiny_config(data_dir, warmup_steps=0, frozen_backbone_steps=1,
                                            backbone_lr_multiplier=0.5), 2)
    assert not change(states[0], states[1], "backbone").any()
    assert np.abs(change(states[0], states[1], "projection")).max() > 1e-5
    assert np.abs(change(states[1], states[2], "backbone")).max() > 1e-5
    stats = [jax.tree.leaves(state.batch_stats) for state in states]
    assert any(not np.array_equal(a, b) for a, b in zip(stats[0], stats[2]))


def test_frozen_batch_norm_keeps_its_statistics_and_normalises_with_them(data_dir):
    frozen = params_after_steps(tiny_config(data_dir, warmup_steps=0, freeze_batch_norm=True), 2)
    stats = lambda state: jax.tree.leaves(state.batch_stats)
    assert len(stats(frozen[0])) == 4  # mean and var of two BatchNorm layers
    for a, b in zip(stats(frozen[0]), stats(frozen[2])):  # they move without the key: above
        np.testing.assert_array_equal(a, b)
    assert np.abs(change(frozen[0], frozen[2], "backbone")).max() > 1e-5  # still learning
    # In training mode it normalises as in evaluation: with the running statistics.
    config = tiny_config(data_dir, freeze_batch_norm=True)
    model = build_model(config, bn_axis_name=None)
    variables = {"params": frozen[2].params["model"], "batch_stats": frozen[2].batch_stats}
    images = np.random.default_rng(0).random((8, 16, 16, 1), np.float32)
    trained, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(trained, model.apply(variables, images, train=False))


def toy_params():
    ones = lambda *shape: jnp.ones(shape, jnp.float32)
    return {"model": {"backbone": {"Conv_0": {"kernel": ones(3, 3, 1, 4), "bias": ones(4)},
                                   "BatchNorm_0": {"scale": ones(4), "bias": ones(4)}},
                      "projection": {"kernel": ones(4, 2), "bias": ones(2)}},
            "loss": {"proxies": ones(3, 2)}}


def test_weight_decay_spares_norms_and_biases_unless_told(data_dir):
    params = toy_params()
    zero_grads = jax.tree.map(jnp.zeros_like, params)  # the update is the decay alone
    for decay_all in (False, True):
        config = tiny_config(data_dir, warmup_steps=0, weight_decay=0.1,
                             decay_norm_and_bias=decay_all)
        optimizer, _ = make_optimizer(config)
        updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
        decayed = {jax.tree_util.keystr(path): bool(np.abs(u).max() > 0)
                   for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
        for name, is_decayed in decayed.items():
            weight = name.endswith("['kernel']") or name.endswith("['proxies']")
            assert is_decayed == (weight or decay_all), (decay_all, name)


def test_the_default_optimiser_is_adamw_step_for_step_and_state_for_state(data_dir):
    config = tiny_config(data_dir, num_train_steps=5, warmup_steps=2)
    optimizer, schedule = make_optimizer(config)
    reference = optax.adamw(schedule, weight_decay=config.weight_decay,
                            mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    params = toy_params()
    ours, theirs = optimizer.init(params), reference.init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)  # checkpoints interchange
    rng = np.random.default_rng(0)
    p_ours = p_theirs = params
    for _ in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        u, ours = optimizer.update(grads, ours, p_ours)
        v, theirs = reference.update(grads, theirs, p_theirs)
        p_ours, p_theirs = optax.apply_updates(p_ours, u), optax.apply_updates(p_theirs, v)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- runs

def test_no_training_saves_the_loaded_state_as_step_0_and_evaluates_it(
        tmp_path, data_dir, trained_workdir, npz_format):
    """A trained run's model, exported to a file and started from with no steps, scores
    what that run scored."""
    source, source_metrics = trained_workdir
    with CheckpointStore(Workdir(source).checkpoints, read_only=True) as store:
        state = store.restore()
    path = save_npz(tmp_path / "trained.npz",
                    {"params": state["params"]["model"], "batch_stats": state["batch_stats"]})
    workdir = str(tmp_path / "wd")
    metrics = train_and_evaluate(tiny_config(data_dir, init_from=path, num_train_steps=0),
                                 workdir)
    with CheckpointStore(Workdir(workdir).checkpoints, read_only=True) as store:
        assert store.latest_step() == 0
        saved = store.restore()
    for a, b in zip(jax.tree.leaves(saved["params"]["model"]),
                    jax.tree.leaves(state["params"]["model"])):
        np.testing.assert_array_equal(a, b)
    assert metrics["checkpoint_step"] == 0
    for name in ("recall@1", "map@r", "r_precision"):
        assert metrics[name] == pytest.approx(source_metrics[name], abs=1e-6), name
    assert metrics["recall@1"] > 0.5  # the trained model's, not a fresh one's


def test_a_resumed_run_continues_from_its_checkpoint_not_the_file(tmp_path, data_dir,
                                                                  npz_format):
    config = tiny_config(data_dir, num_train_steps=0)
    first = scrambled(fresh_variables(config), 1)
    path = save_npz(tmp_path / "w.npz", first)
    config.init_from = path
    workdir = str(tmp_path / "wd")
    train(config, workdir)
    assert npz_format == [path]
    save_npz(path, scrambled(first, 2))  # the file changes; the run must not notice
    config.num_train_steps, config.backbone_lr_multiplier = 2, 0.0
    train(config, workdir)
    assert npz_format == [path]  # not read again
    with CheckpointStore(Workdir(workdir).checkpoints, read_only=True) as store:
        assert store.latest_step() == 2
        backbone = store.restore()["params"]["model"]["backbone"]
    for a, b in zip(jax.tree.leaves(backbone), jax.tree.leaves(first["params"]["backbone"])):
        np.testing.assert_array_equal(a, b)
    os.remove(path)  # nor need it be there any more: the keys come from config.json
    config.num_train_steps = 3
    train(config, workdir)
    assert latest_checkpoint_step(Workdir(workdir).checkpoints) == 3


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, message", [
    ({"num_train_steps": -1}, "num_train_steps=-1"),
    ({"init_format": "caffe", "init_from": "x"}, "init_format='caffe'; use one of dlib"),
    ({"init_format": "dlib"}, "init_format='dlib' without init_from"),
    ({"backbone_lr_multiplier": -0.5}, "backbone_lr_multiplier=-0.5"),
    ({"frozen_backbone_steps": -1}, "frozen_backbone_steps=-1"),
    ({"model__input_norm": "zscore"}, "model.input_norm='zscore'; use one of centred, dlib"),
    ({"model__input_norm": "imagenet"}, "normalises RGB images; channels=1"),
    ({"model__name": "dlib_face_resnet", "channels": 3}, "takes 150x150 RGB face chips"),
])
def test_validation_refuses_bad_pretrained_and_fine_tuning_values(data_dir, overrides, message):
    with pytest.raises(JaxRetrievalError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_config(tiny_config(data_dir, **overrides))


def test_the_new_keys_default_to_a_from_scratch_run_and_old_workdirs_still_match(data_dir):
    config = tiny_config(data_dir, num_train_steps=0)
    validate_config(config)  # no steps is a valid run
    old = json.loads(config_to_json(tiny_config(data_dir)))  # a config.json from before these keys
    for key in ("init_from", "init_format", "backbone_lr_multiplier", "frozen_backbone_steps",
                "freeze_batch_norm", "decay_norm_and_bias"):
        del old[key]
    del old["model"]["input_norm"], old["model"]["projection_bias"]
    restored = config_from_json(json.dumps(old))
    assert restored.init_from == "" and restored.model.input_norm == "centred"
    for key in RUN_KEYS:
        assert model_config_hash(restored, (key,)) == model_config_hash(tiny_config(data_dir),
                                                                         (key,)), key


def test_imagenet_normalisation_centres_imagenets_mean_colour():
    mean = jnp.asarray([[[0.485, 0.456, 0.406]]], jnp.float32)
    np.testing.assert_allclose(INPUT_NORMS["imagenet"].normalize(mean), 0, atol=1e-6)
    np.testing.assert_allclose(INPUT_NORMS["imagenet"].normalize(mean + 0.229)[..., 0], 1,
                               atol=1e-5)


# ---------------------------------------------------------------- dlib's face network

@pytest.fixture(scope="module")
def dlib_file():
    from jaxretrieval.data.faces import FACE_RESNET_FILE, face_model_file
    return face_model_file(FACE_RESNET_FILE)


@needs_faces
def test_the_dlib_file_configures_and_fills_the_whole_model(dlib_file, data_dir, caplog):
    config = tiny_config(data_dir, init_from=dlib_file)
    assert find_format(dlib_file) == "dlib"
    with caplog.at_level(logging.INFO, logger="jaxretrieval.models.pretrained"):
        config = configured_for_init(config)
    assert "init_from sets model.name: seed_cnn -> dlib_face_resnet" in caplog.text
    validate_config(config)
    assert (config.image_size, config.channels, config.embedding_dim) == (150, 3, 128)
    zeros = jax.tree.map(np.zeros_like, fresh_variables(config))
    loaded = initial_variables(config, zeros)
    # Every array comes from the file: the trunk and the 128-d head, which has no bias.
    assert set(loaded["params"]["projection"]) == {"kernel"}
    assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(loaded))

    config.embedding_dim = 64  # the file's head is 128-d
    with pytest.raises(JaxRetrievalError, match=r"params/projection/kernel has shape "
                                                r"\(256, 128\) in the file, the model "
                                                r"expects \(256, 64\)"):
        initial_variables(config, fresh_variables(config))


@needs_faces
def test_the_dlib_file_truncated_is_refused_with_the_readers_error(dlib_file, data_dir,
                                                                   tmp_path):
    path = tmp_path / "cut.dat"
    with open(dlib_file, "rb") as f:
        path.write_bytes(f.read()[:os.path.getsize(dlib_file) // 2])
    config = configured_for_init(tiny_config(data_dir, init_from=str(path)))
    with pytest.raises(JaxRetrievalError, match=r"is it truncated\?"):
        initial_variables(config, fresh_variables(config))


@needs_faces
def test_the_pretrained_models_embedding_is_dlibs_descriptor_normalised(dlib_file, data_dir):
    import dlib

    from jaxretrieval.data.faces import align_faces
    from jaxretrieval.embed import Embedder

    paths = [os.path.join(YALEFACES, f"subject{i:02d}", "normal.gif") for i in range(1, 5)]
    images = [Image.open(p) for p in paths if os.path.isfile(p)]
    ramp = np.linspace(0, 255, 150, dtype=np.float32)
    images.append(np.round(np.add.outer(ramp, ramp) / 2).astype(np.uint8))  # no face in it
    chips, _ = align_faces(images)

    config = configured_for_init(tiny_config(data_dir, init_from=dlib_file))
    variables = initial_variables(config, fresh_variables(config))
    ours = Embedder(config, variables, checkpoint_step=0).embed_uint8(chips)

    net = dlib.face_recognition_model_v1(dlib_file)
    theirs = np.array([np.array(net.compute_face_descriptor(chip)) for chip in chips])
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    difference = float(np.abs(ours - theirs).max())
    print(f"largest |ours - dlib normalised| over {len(chips)} chips: {difference:.3g}")
    assert difference < 1e-4
