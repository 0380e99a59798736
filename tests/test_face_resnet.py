"""dlib's face ResNet: the file reader, the Flax module against dlib itself, face alignment.

The tests that need dlib or the face-recognition-models files skip without them, and fail
instead when JAXRETRIEVAL_REQUIRE_FACES is set (CI installs both through the test extra).
"""

import dataclasses
import importlib.util
import os
import sys
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import YALEFACES
from jaxretrieval.data import faces
from jaxretrieval.data.faces import FACE_RESNET_FILE, SHAPE_PREDICTOR_FILE, align_faces
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models.dlib_format import parse_dlib_network, read_dlib_network
from jaxretrieval.models.face_resnet import (DlibFaceResNet, add_zero_padded, preprocess_dlib,
                                             variables_from_dlib)

HAVE_FACES = (importlib.util.find_spec("dlib") is not None
              and importlib.util.find_spec("face_recognition_models") is not None)
needs_faces = pytest.mark.skipif(
    not HAVE_FACES and not os.environ.get("JAXRETRIEVAL_REQUIRE_FACES"),
    reason='dlib and face-recognition-models are not installed (pip install -e ".[faces]")')

# One image per subject, all lit from the front; the dlib check also runs without them.
YALE_IMAGES = [os.path.join(YALEFACES, f"subject{i:02d}", "normal.gif") for i in range(1, 7)]


def blank_image():
    """A smooth gradient: no face in it, and still something for the network to see."""
    ramp = np.linspace(0, 255, 200, dtype=np.float32)
    return np.round(np.add.outer(ramp, ramp[:160]) / 2).astype(np.uint8)  # grayscale


@pytest.fixture(scope="module")
def network_file():
    return faces.face_model_file(FACE_RESNET_FILE)


@pytest.fixture(scope="module")
def layers(network_file):
    return read_dlib_network(network_file)


@pytest.fixture(scope="module")
def variables(layers):
    return variables_from_dlib(layers)


@pytest.fixture(scope="module")
def aligned():
    """(chips, found) for the yalefaces images (when present) and the blank image, last."""
    images = [Image.open(path) for path in YALE_IMAGES if os.path.isfile(path)]
    return align_faces(images + [blank_image()])


def descriptors(variables, chips, dtype=jnp.float32):
    """Our 128-d descriptors before L2 normalisation: trunk, global mean, the file's head."""
    params, head_kernel = variables
    features = DlibFaceResNet(dtype=dtype).apply({"params": params}, preprocess_dlib(chips))
    return np.asarray(features.astype(jnp.float32).mean(axis=(1, 2)) @ head_kernel)


@needs_faces
def test_the_reader_reads_dlibs_face_resnet_layer_by_layer(layers):
    counts = Counter(layer.type for layer in layers)
    assert counts == {"con": 29, "affine": 29, "relu": 29, "tag_or_skip": 22, "add_prev": 14,
                      "avg_pool": 5, "max_pool": 1, "fc": 1, "input_rgb_image_sized": 1,
                      "loss_metric": 1}
    assert [layers[0].type, layers[-1].type] == ["input_rgb_image_sized", "loss_metric"]
    assert layers[0].params["rows"] == layers[0].params["columns"] == 150
    assert layers[0].params["avg_red"] == pytest.approx(122.782, abs=1e-4)
    stem = layers[1]
    assert stem.params["kernel"] == (7, 7) and stem.params["stride"] == (2, 2)
    assert stem.params["padding"] == (0, 0)
    assert stem.tensors["filters"].shape == (32, 3, 7, 7)
    (fc,) = [layer for layer in layers if layer.type == "fc"]
    assert fc.params["bias_mode"] == "no_bias" and "biases" not in fc.tensors
    assert fc.tensors["weights"].shape == (256, 128, 1, 1)
    tensors = [t for layer in layers for t in layer.tensors.values()]
    assert sum(t.size for t in tensors) == 5_614_592  # the architecture's count, by hand
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors)


def malformed_file(case, network_file, tmp_path):
    """The path of a file that is not dlib's face ResNet, or no longer whole."""
    path = tmp_path / f"{case}.dat"
    if case == "truncated":
        with open(network_file, "rb") as f:
            path.write_bytes(f.read()[:os.path.getsize(network_file) * 2 // 3])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "shape_predictor":  # a dlib file, but not a network
        path = faces.face_model_file(SHAPE_PREDICTOR_FILE)
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "png":
        Image.new("RGB", (8, 8)).save(path, format="PNG")
    elif case == "bzip2":  # the form dlib.net serves its files in
        path.write_bytes(b"BZh91AY&SY" + bytes(64))
    return path


@needs_faces
@pytest.mark.parametrize("case, says", [
    ("truncated", "is it truncated?"),
    ("empty", "the file is empty"),
    ("shape_predictor", "expected a loss layer record"),
    ("random", "Expected a network saved by dlib's serialize()"),
    ("png", "bad integer control byte 0x89"),
    ("bzip2", "decompress it first"),
])
def test_the_reader_rejects_other_and_damaged_files(case, says, network_file, tmp_path):
    with pytest.raises(JaxRetrievalError) as error:
        read_dlib_network(malformed_file(case, network_file, tmp_path))
    message = str(error.value)
    assert "is not a dlib network file this reader can read" in message
    assert "dlib_face_recognition_resnet_model_v1.dat" in message and says in message


def test_the_reader_needs_no_dlib_and_names_a_missing_file(tmp_path):
    with pytest.raises(JaxRetrievalError, match="file ends inside"):
        parse_dlib_network(b"\x01\x01\x01\x0dloss_metric_2\x03\x0a")  # a cut-off network
    with pytest.raises(JaxRetrievalError, match="cannot read the dlib network file"):
        read_dlib_network(tmp_path / "missing.dat")


@needs_faces
def test_the_files_weights_fill_the_flax_module_exactly(variables):
    params, head_kernel = variables
    x = jax.ShapeDtypeStruct((1, 150, 150, 3), jnp.float32)
    model = DlibFaceResNet()
    expected = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert (jax.tree.map(lambda a: a.shape, expected)
            == jax.tree.map(lambda a: a.shape, params))
    assert jax.eval_shape(model.apply, {"params": params}, x).shape == (1, 2, 2, 256)
    assert head_kernel.shape == (256, 128)


@needs_faces
def test_variables_from_dlib_refuses_another_network(layers):
    changed = list(layers)
    changed[1] = dataclasses.replace(layers[1], params={**layers[1].params, "stride": (1, 1)})
    with pytest.raises(JaxRetrievalError, match="not dlib's face ResNet: layer 1"):
        variables_from_dlib(changed)


@needs_faces
def test_our_descriptor_equals_dlibs_on_the_same_chips(variables, network_file, aligned):
    import dlib

    chips, _ = aligned
    net = dlib.face_recognition_model_v1(network_file)
    theirs = np.array([np.array(net.compute_face_descriptor(chip)) for chip in chips])
    ours = descriptors(variables, chips)
    difference = float(np.abs(ours - theirs).max())
    print(f"largest |ours - dlib| over {len(chips)} chips: {difference:.3g}")
    assert difference < 1e-3
    assert np.abs(theirs).max() > 0.1  # real descriptors, not zeros on both sides


@needs_faces
def test_align_faces_gives_a_chip_for_every_image(aligned):
    chips, found = aligned
    assert chips.dtype == np.uint8 and chips.shape == (len(found), 150, 150, 3)
    assert found.dtype == bool
    assert found[:-1].all() and not found[-1]  # every face found; none in the blank image
    assert chips[-1].std() > 1  # the blank image is still aligned: the whole image, cut
    again, found_again = align_faces([np.asarray(blank_image())[..., None]])  # HxWx1 input
    np.testing.assert_array_equal(again[0], chips[-1])
    assert not found_again[0]


@needs_faces
def test_bfloat16_compute_stays_close_to_float32(variables, aligned):
    chips, _ = aligned
    full = descriptors(variables, chips)
    half = descriptors(variables, chips, jnp.bfloat16)
    cosine = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    print(f"bfloat16 against float32: smallest cosine {cosine.min():.5f}")
    assert cosine.min() > 0.99


def test_add_zero_padded_follows_dlibs_add_prev():
    block = np.arange(1, 1 + 1 * 3 * 3 * 4, dtype=np.float32).reshape(1, 3, 3, 4)
    shortcut = np.full((1, 4, 4, 2), 100, np.float32)
    out = np.asarray(add_zero_padded(jnp.asarray(block), jnp.asarray(shortcut)))
    assert out.shape == (1, 4, 4, 4)
    np.testing.assert_array_equal(out[:, :3, :3, :2], block[..., :2] + 100)
    np.testing.assert_array_equal(out[:, :3, :3, 2:], block[..., 2:])
    np.testing.assert_array_equal(out[:, 3, :, :2], 100)  # only the shortcut reaches here
    np.testing.assert_array_equal(out[:, 3, :, 2:], 0)


def test_preprocess_dlib_takes_pixels_or_the_packages_unit_floats():
    pixels = np.array([[[0, 128, 255]]], np.uint8)
    expected = (np.array([0, 128, 255], np.float32) - [122.782, 117.001, 104.298]) / 256
    np.testing.assert_allclose(preprocess_dlib(pixels)[0, 0], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(preprocess_dlib(pixels / np.float32(255)), preprocess_dlib(pixels),
                               rtol=0, atol=1e-6)


def test_face_alignment_without_dlib_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` fail
    with pytest.raises(JaxRetrievalError, match=r'pip install -e "\.\[faces\]"'):
        align_faces([blank_image()])
