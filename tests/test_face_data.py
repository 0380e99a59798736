"""Aligned faces as a run's input: the dataset's cached chips, queries aligned the same way
in the Retriever and the service, the no-face count in metrics.json, and flip_test.

The tests that need dlib, face-recognition-models or yalefaces skip without them, and fail
instead when JAXRETRIEVAL_REQUIRE_FACES is set (CI installs the first two through the test
extra).
"""

import importlib.util
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import REPO, YALEFACES, tiny_config
from jaxretrieval.config import base_config, load_config_file, validate_config
from jaxretrieval.data import face_chips, faces
from jaxretrieval.data.images import read_image_file
from jaxretrieval.data.sources import load_dataset
from jaxretrieval.embed import Embedder
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import build_model

HAVE_DLIB = (importlib.util.find_spec("dlib") is not None
             and importlib.util.find_spec("face_recognition_models") is not None)
HAVE_YALEFACES = os.path.isdir(YALEFACES)
# CI sets this: there the face extra must be installed; the face photos come from
# ../shared/data/yalefaces, beside the repository, and skip the tests where it is absent.
REQUIRED = os.environ.get("JAXRETRIEVAL_REQUIRE_FACES") == "1"
needs_faces = pytest.mark.skipif(
    not HAVE_YALEFACES or (not HAVE_DLIB and not REQUIRED),
    reason='dlib and face-recognition-models (pip install -e ".[faces]") and '
           "../shared/data/yalefaces are needed")

SUBJECTS = ("subject01", "subject02", "subject03")
EXPRESSIONS = ("normal", "happy", "sad", "glasses")
BLANK_KEY = "subject01/blank.png"


@pytest.fixture(scope="module")
def chip_cache(tmp_path_factory):
    """A face chip cache of this module's own. Not through XDG_CACHE_HOME: the other caches
    under it (the compiled convolution library) would be built again."""
    path = str(tmp_path_factory.mktemp("face_chips"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(face_chips, "cache_dir", lambda: path)
        yield path


def test_the_chip_cache_lives_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert face_chips.cache_dir() == os.path.join(str(tmp_path), "jaxretrieval", "face_chips")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert face_chips.cache_dir() == os.path.expanduser("~/.cache/jaxretrieval/face_chips")


def make_face_folder(root) -> str:
    """Three yalefaces subjects, four photos each, and a blank image with no face."""
    for subject in SUBJECTS:
        os.makedirs(os.path.join(root, subject))
        for expression in EXPRESSIONS:
            shutil.copy2(os.path.join(YALEFACES, subject, f"{expression}.gif"),
                         os.path.join(root, subject, f"{expression}.gif"))
    ramp = np.linspace(0, 255, 160).astype(np.uint8)
    Image.fromarray(np.add.outer(ramp, ramp[:120]) // 2).save(os.path.join(root, BLANK_KEY))
    return str(root)


def face_config(folder, **changes):
    """A tiny seed CNN (conftest's) on 32x32 aligned RGB chips."""
    config = tiny_config("", dataset=f"folder:{folder}", image_size=32, channels=3,
                         model__align_faces=True, global_batch_size=8, num_train_steps=3,
                         warmup_steps=1, log_every_steps=1, checkpoint_every_steps=3,
                         embed_batch_size=16, augment__enabled=False, **changes)
    validate_config(config)
    return config


@pytest.fixture
def count_alignments(monkeypatch):
    """The number of images aligned so far, counted at `faces.align_face`."""
    calls = []
    original = faces.align_face

    def counting(image, size=faces.CHIP_SIZE, upsample=0):
        calls.append(size)
        return original(image, size, upsample)

    monkeypatch.setattr(faces, "align_face", counting)
    return calls


@needs_faces
def test_chips_are_cut_from_the_originals_cached_and_made_again_when_a_file_changes(
        tmp_path, chip_cache, count_alignments):
    folder = make_face_folder(tmp_path / "faces")
    config = face_config(folder)
    first = load_dataset(config)
    count = len(first)
    assert count == len(SUBJECTS) * len(EXPRESSIONS) + 1
    assert len(count_alignments) == count and first.faces_not_found == 1
    # Each item is the chip of its original photo, not of the 32x32 resized input.
    row = first.keys.index("subject02/happy.gif")
    want, found = faces.align_face(read_image_file(first.sources[row]), 32)
    assert found and np.array_equal(first.images([row])[0], want)
    assert len([f for f in os.listdir(chip_cache) if f.endswith(".npy")]) == 1

    count_alignments.clear()
    second = load_dataset(config)
    assert count_alignments == [] and second.faces_not_found == 1
    assert np.array_equal(second.images(np.arange(count)), first.images(np.arange(count)))

    # Another photo under the same name: the cache no longer matches, every image is aligned.
    changed = os.path.join(folder, "subject02", "happy.gif")
    shutil.copyfile(os.path.join(YALEFACES, "subject02", "wink.gif"), changed)
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    third = load_dataset(config)
    assert len(count_alignments) == count
    assert not np.array_equal(third.images([row]), first.images([row]))


@needs_faces
def test_an_unreadable_cache_entry_is_made_again(tmp_path, chip_cache, count_alignments):
    folder = make_face_folder(tmp_path / "faces")
    config = face_config(folder)
    want = load_dataset(config).images(np.arange(3))
    for name in os.listdir(chip_cache):
        if name.endswith(".npy"):
            with open(os.path.join(chip_cache, name), "wb") as f:
                f.write(b"not an array")
    count_alignments.clear()
    again = load_dataset(config)
    assert len(count_alignments) == len(again)
    assert np.array_equal(again.images(np.arange(3)), want)


def test_the_faces_config_says_how_to_install_its_model(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        None if name == "face_recognition_models" else find_spec(name, *args)))
    with pytest.raises(JaxRetrievalError, match=r'pip install -e "\.\[faces\]"'):
        load_config_file(os.path.join(REPO, "configs", "faces.py"))


def test_align_faces_needs_rgb():
    config = base_config()
    config.model.align_faces = True
    with pytest.raises(JaxRetrievalError, match="align_faces needs channels=3"):
        validate_config(config)


@pytest.fixture(scope="module")
def face_run(tmp_path_factory, chip_cache):
    """A tiny run on aligned faces: trained a few steps, evaluated and indexed."""
    if not HAVE_YALEFACES:
        pytest.skip("../shared/data/yalefaces is not present")
    if not HAVE_DLIB:
        if REQUIRED:
            pytest.fail("JAXRETRIEVAL_REQUIRE_FACES=1: dlib or face-recognition-models is "
                        'missing (pip install -e ".[faces]")')
        pytest.skip('needs dlib and face-recognition-models (pip install -e ".[faces]")')
    from jaxretrieval.training import train_and_evaluate

    folder = make_face_folder(tmp_path_factory.mktemp("run_faces"))
    workdir = str(tmp_path_factory.mktemp("face_run") / "wd")
    metrics = train_and_evaluate(face_config(folder), workdir)
    return folder, workdir, metrics


@needs_faces
def test_the_no_face_count_reaches_metrics_json(face_run):
    _, workdir, metrics = face_run
    with open(os.path.join(workdir, "metrics.json")) as f:
        written = json.load(f)
    assert metrics["faces_not_found"] == written["faces_not_found"] == 1


@pytest.fixture(scope="module")
def face_retriever(face_run):
    from jaxretrieval.retriever import Retriever

    retriever = Retriever.load(face_run[1])
    yield retriever
    retriever.close()


@needs_faces
def test_queries_by_path_and_array_are_aligned_like_the_gallery(face_run, face_retriever):
    folder = face_run[0]
    key = "subject03/sad.gif"
    path = os.path.join(folder, key)
    photo = np.asarray(Image.open(path).convert("RGB"))
    keys, scores = face_retriever.search([path, photo], k=3)
    for row in range(2):
        assert keys[row][0] == key
        assert scores[row][0] == pytest.approx(1.0, abs=1e-5)


@needs_faces
def test_the_service_aligns_an_uploaded_photo_as_the_retriever_does(face_run, face_retriever):
    from jaxretrieval.service.app import ServiceSettings, create_app

    key = "subject02/glasses.gif"
    photo = Image.open(os.path.join(face_run[0], key)).convert("RGB")
    upload = io.BytesIO()
    photo.save(upload, format="PNG")
    settings = ServiceSettings(max_k=10, max_upload_bytes=1_000_000, max_pixels=1_000_000,
                               allowed_hosts=("testserver",))  # TestClient's Host
    with TestClient(create_app(face_retriever, settings)) as client:
        response = client.post("/search?k=3", files={"image": ("q.png", upload.getvalue(),
                                                               "image/png")})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    keys, scores = face_retriever.search([np.asarray(photo)], k=3)
    assert [r["id"] for r in results] == list(keys[0]) and results[0]["id"] == key
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)


def flip_embedder(flip_test: bool) -> Embedder:
    config = base_config()
    config.image_size = 8
    config.channels = 3
    config.model.widths = (8,)
    config.embedding_dim = 8
    config.embed_batch_size = 4  # one compiled batch size
    config.model.flip_test = flip_test
    variables = build_model(config).init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    return Embedder(config, variables, checkpoint_step=0)


def test_flip_test_embeds_an_image_and_its_mirror_alike_with_unit_norm():
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mirrored = images[:, :, ::-1]
    embedder = flip_embedder(True)
    a, b = embedder.embed_uint8(images), embedder.embed_uint8(np.ascontiguousarray(mirrored))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    # The same network without it tells the two apart: the test above has something to show.
    plain = flip_embedder(False)
    assert np.abs(plain.embed_uint8(images) - plain.embed_uint8(
        np.ascontiguousarray(mirrored))).max() > 1e-3
    # And with it, an image's embedding is the normalised mean of the two plain ones.
    mean = plain.embed_uint8(images) + plain.embed_uint8(np.ascontiguousarray(mirrored))
    np.testing.assert_allclose(a, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
