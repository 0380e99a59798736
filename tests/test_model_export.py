"""The exported model (jaxretrieval.model_export, `jaxretrieval export-model`): StableHLO and a
TF SavedModel, each run in a process that cannot import this package (nor, for the
SavedModel, JAX), embed as the Retriever does, for any batch size."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from jaxretrieval import cli, model_export
from jaxretrieval.embed import Embedder, embedding_function, restore_model
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.model_export import export_model
from jaxretrieval.ops.conv import conv_general_dilated, onednn_available, xla_convolutions
from jaxretrieval.retriever import Retriever

BATCH_SIZES = (1, 6)
# Run first in the subprocesses: any import of these fails, and nothing of them is loaded
# at the end (TensorFlow imports JAX when it can; it does without).
BLOCK_IMPORTS = (
    "import sys\n"
    "BLOCKED = sys.argv[1].split(',')\n"
    "for name in BLOCKED:\n"
    "    sys.modules[name] = None\n"
    "def check_blocked():\n"
    "    loaded = [m for m, module in sys.modules.items()\n"
    "              if m.split('.')[0] in BLOCKED and module is not None]\n"
    "    assert not loaded, loaded\n")
RUN_STABLEHLO = BLOCK_IMPORTS + (
    "import numpy as np\n"
    "from jax import export\n"
    "with open(sys.argv[2] + '/model.stablehlo', 'rb') as f:\n"
    "    exported = export.deserialize(bytearray(f.read()))\n"
    "inputs = np.load(sys.argv[3])\n"
    "np.savez(sys.argv[4], **{name: np.asarray(exported.call(images))\n"
    "                         for name, images in inputs.items()})\n"
    "check_blocked()\n")
RUN_SAVED_MODEL = BLOCK_IMPORTS + (
    "import numpy as np\n"
    "import tensorflow as tf\n"
    "serve = tf.saved_model.load(sys.argv[2]).signatures['serving_default']\n"
    "inputs = np.load(sys.argv[3])\n"
    "np.savez(sys.argv[4], **{name: serve(images=tf.constant(images))['embeddings'].numpy()\n"
    "                         for name, images in inputs.items()})\n"
    "check_blocked()\n")


@pytest.fixture(scope="module")
def exports(trained_workdir, tmp_path_factory):
    """The trained workdir's model exported in both formats: {format: directory}."""
    root = tmp_path_factory.mktemp("exports")
    directories = {fmt: str(root / fmt) for fmt in model_export.FORMATS}
    for fmt, directory in directories.items():
        export_model(trained_workdir[0], fmt, directory)
    return directories


def images_for(shape, seed=0):
    """{name: uint8 batch}, one per size of BATCH_SIZES: digits of the dataset, made into
    the model's input as the Retriever makes them, then random pixels."""
    from sklearn.datasets import load_digits

    from jaxretrieval.data.images import InputSpec, load_images

    first, *others = BATCH_SIZES
    digits = np.round(load_digits().images[seed:seed + first] * 255 / 16).astype(np.uint8)
    batches = {f"batch{first}": load_images(list(digits), InputSpec(shape[0], shape[2]))}
    rng = np.random.RandomState(seed)
    for n in others:
        batches[f"batch{n}"] = rng.randint(0, 256, (n, *shape)).astype(np.uint8)
    return batches


def assert_same_embeddings(got, expected):
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-4
    cosines = np.sum(got * expected, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosines.min() > 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def run_without_package(code, export_dir, blocked, tmp_path, inputs):
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = run_python(code, ",".join(blocked), export_dir, tmp_path / "inputs.npz",
                        tmp_path / "outputs.npz")
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(tmp_path / "outputs.npz"))


@pytest.mark.parametrize("fmt, code, blocked", [
    ("stablehlo", RUN_STABLEHLO, ("jaxretrieval", "flax")),
    ("savedmodel", RUN_SAVED_MODEL, ("jaxretrieval", "flax", "jax", "jaxlib")),
])
def test_the_export_embeds_as_the_retriever_without_this_package(
        trained_workdir, exports, tmp_path, fmt, code, blocked):
    retriever = Retriever.load(trained_workdir[0])
    config = retriever.embedder.config
    inputs = images_for((config.image_size, config.image_size, config.channels))
    outputs = run_without_package(code, exports[fmt], blocked, tmp_path, inputs)
    assert sorted(outputs) == sorted(inputs)
    for name, images in inputs.items():
        assert_same_embeddings(outputs[name], retriever.embed_uint8(images))


def custom_call_targets(text: str) -> set:
    return set(re.findall(r"custom_call\s*@([\w.]+)", text))


def test_the_stablehlo_module_calls_no_custom_call_of_this_package_and_says_what_it_takes(
        trained_workdir, exports):
    from jax import export

    with open(os.path.join(exports["stablehlo"], model_export.STABLEHLO_FILE), "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    targets = custom_call_targets(exported.mlir_module())
    assert not [t for t in targets if t.startswith("jaxretrieval")], targets
    assert exported.platforms == ("cpu", "cuda")
    (avals,) = exported.in_avals
    assert avals.dtype == jnp.uint8 and avals.shape[1:] == (16, 16, 1)
    assert not isinstance(avals.shape[0], int)  # symbolic: any batch size

    embedder = Embedder.from_workdir(trained_workdir[0])
    for fmt, directory in exports.items():
        with open(os.path.join(directory, model_export.METADATA_FILE)) as f:
            meta = json.load(f)
        assert meta["format"] == fmt
        assert meta["input"]["shape"] == [None, 16, 16, 1] and meta["input"]["dtype"] == "uint8"
        assert meta["embedding_dim"] == 16 and meta["normalization"] == "centred"
        assert meta["model"] == "seed_cnn" and meta["input"]["aligned_face_chips"] is False
        assert meta["model_config_hash"] == embedder.model_config_hash
        assert meta["checkpoint_step"] == embedder.checkpoint_step
    with open(os.path.join(exports["savedmodel"], "saved_model.pb"), "rb") as f:
        assert b"jaxretrieval_conv" not in f.read()


def test_xla_convolutions_keeps_the_custom_calls_out_of_what_is_traced_inside(trained_workdir):
    config, variables, _ = restore_model(trained_workdir[0])
    embed_fn = embedding_function(config)
    images = jax.ShapeDtypeStruct((4, 16, 16, 1), jnp.uint8)
    # One jitted function, traced outside the block, inside, and outside again: the block
    # is part of jit's cache key, so no trace of one side is reused on the other.
    embed = jax.jit(lambda x: embed_fn(variables, x))
    outside = custom_call_targets(embed.lower(images).as_text())
    with xla_convolutions():
        inside = custom_call_targets(embed.lower(images).as_text())
    assert not [t for t in inside if t.startswith("jaxretrieval")], inside
    if onednn_available():  # the check above sees them where they are traced
        assert "jaxretrieval_conv_forward" in outside
        assert custom_call_targets(embed.lower(images).as_text()) == outside
        x = jnp.ones((1, 8, 8, 4), jnp.float32)
        kernel = jnp.ones((3, 3, 4, 8), jnp.float32)
        conv = jax.jit(lambda a, b: conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        assert "jaxretrieval_conv_forward" in conv.lower(x, kernel).as_text()
        with xla_convolutions():
            assert "jaxretrieval" not in conv.lower(x, kernel).as_text()
            np.testing.assert_allclose(conv(x, kernel)[0, 1, 1], 36.0)


def test_mirror_test_time_augmentation_is_in_the_program(trained_workdir, tmp_path):
    from jax import export

    workdir = str(tmp_path / "flip")
    shutil.copytree(trained_workdir[0], workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    config["model"]["flip_test"] = True
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    meta = export_model(workdir, "stablehlo", str(tmp_path / "out"))
    assert meta["flip_test"] is True
    with open(tmp_path / "out" / model_export.STABLEHLO_FILE, "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    embedder = Embedder.from_workdir(workdir)
    unflipped = Embedder.from_workdir(trained_workdir[0])
    for images in images_for((16, 16, 1), seed=1).values():
        got = np.asarray(exported.call(images))
        assert_same_embeddings(got, embedder.embed_uint8(images))
        assert np.abs(got - unflipped.embed_uint8(images)).max() > 1e-3


def leftovers(parent, name):
    return [entry for entry in os.listdir(parent) if entry.startswith(f".{name}.")]


def test_each_bad_request_is_one_clear_error_and_writes_nothing(trained_workdir, tmp_path):
    workdir = trained_workdir[0]
    out = tmp_path / "out"
    with pytest.raises(JaxRetrievalError, match="unknown export format 'onnx'; use one of "
                                                "stablehlo, savedmodel"):
        export_model(workdir, "onnx", str(out))
    with pytest.raises(JaxRetrievalError,
                       match=r"platforms cpu,gpu \(unknown: 'gpu'\); name each once, from cpu"):
        export_model(workdir, "stablehlo", str(out), platforms=("cpu", "gpu"))
    with pytest.raises(JaxRetrievalError, match="is not a training workdir"):
        export_model(str(tmp_path / "nowhere"), "stablehlo", str(out))
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), untrained)
    with pytest.raises(JaxRetrievalError, match="no checkpoints in .*train into it first"):
        export_model(str(untrained), "stablehlo", str(out))
    (untrained / "checkpoints").mkdir()
    with pytest.raises(JaxRetrievalError, match="no checkpoint in .*train first"):
        export_model(str(untrained), "stablehlo", str(out))
    assert not os.path.exists(out) and not leftovers(tmp_path, "out")

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(JaxRetrievalError, match="exists; an export never replaces anything"):
        export_model(workdir, "stablehlo", str(existing))
    assert os.listdir(existing) == ["keep.txt"]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(JaxRetrievalError, match="is not a folder you can write to"):
        export_model(workdir, "stablehlo", str(tmp_path / "a_file" / "out"))
    assert not leftovers(tmp_path, "existing") and not leftovers(tmp_path, "a_file")


def test_an_export_that_fails_midway_leaves_nothing_at_its_path(trained_workdir, tmp_path,
                                                                monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    # model.json is written last, after the program: it fails with the program written.
    monkeypatch.setattr(model_export, "write_json_atomically", fail)
    with pytest.raises(OSError, match="disk full"):
        export_model(trained_workdir[0], "stablehlo", str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_the_command_exports_and_refuses_a_bad_format_in_one_line(trained_workdir, tmp_path,
                                                                  capsys, monkeypatch):
    # `cli.main` sets up the process; keep this test process's JAX config as it was.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    out = str(tmp_path / "out")
    argv = ["export-model", "--workdir", trained_workdir[0], "--output", out]
    assert cli.main(argv + ["--format", "tflite"]) == 1
    err = capsys.readouterr().err
    assert err == "error: unknown export format 'tflite'; use one of stablehlo, savedmodel\n"
    assert cli.main(argv + ["--format", "stablehlo", "--platforms", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["platforms"] == ["cpu"] and printed["format"] == "stablehlo"
    assert sorted(os.listdir(out)) == [model_export.METADATA_FILE, model_export.STABLEHLO_FILE]
    umask = os.umask(0o022)
    os.umask(umask)
    # Readable by others as far as the umask allows: the temporary folder it was written in
    # is private to this user.
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    for name in os.listdir(out):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask
    assert cli.main(argv + ["--format", "stablehlo"]) == 1
    assert "exists; an export never replaces anything" in capsys.readouterr().err
