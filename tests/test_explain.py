"""Explaining a match (jaxretrieval.explain): the decomposition adds up and agrees with the
model's own maths, the heat lands where two images share something, mirroring mirrors it,
and the CLI, the service and the page show it."""

import base64
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxretrieval import cli
from jaxretrieval.config import base_config
from jaxretrieval.data.augment import preprocess
from jaxretrieval.embed import embedding_function
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.explain import (EXACT, FINAL, GRAD_X_ACTIVATION, Explainer, check_stage,
                                  default_stage, stage_shapes)
from jaxretrieval.models import build_model, embed_with_feature_map


def small_config(pooling="avg", *, image_size=16, channels=1, widths=(8, 16), kernel_size=3,
                 embedding_dim=16, flip_test=False, batch_norm=True):
    config = base_config()
    config.image_size, config.channels = image_size, channels
    config.model.widths, config.model.kernel_size = widths, kernel_size
    config.model.batch_norm, config.model.pooling = batch_norm, pooling
    config.model.flip_test = flip_test
    config.embedding_dim = embedding_dim
    return config


def initial_variables(config, seed=0):
    model = build_model(config)
    shape = (1, config.image_size, config.image_size, config.channels)
    variables = jax.tree.map(np.array, jax.jit(model.init)(jax.random.key(seed),
                                                           jnp.zeros(shape)))
    # A bias that matters: the exact decomposition has to account for it.
    bias = variables["params"]["projection"]["bias"]
    bias[:] = np.random.default_rng(seed).normal(0.0, 0.5, bias.shape)
    return variables


def random_images(config, n, seed):
    shape = (n, config.image_size, config.image_size, config.channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def head_maths(config, variables, images_a, images_b):
    """Stylianou et al.'s decomposition written out from the feature maps and the projection,
    apart from the Explainer: heat_a[i] = <(W F_a[i] + b) / N, e_b> / |u_a| (no flip_test)."""
    model = build_model(config)
    kernel = variables["params"]["projection"]["kernel"]
    bias = variables["params"]["projection"]["bias"]
    out = []
    embeddings, features = [], []
    for images in (images_a, images_b):
        e, f = jax.jit(lambda v, x: embed_with_feature_map(model, v, preprocess(x)))(
            variables, images)
        embeddings.append(np.asarray(e, np.float64))
        features.append(np.asarray(f, np.float64))
    for own, other in ((0, 1), (1, 0)):
        f = features[own]
        positions = f.shape[1] * f.shape[2]
        per_position = (f @ kernel + bias) / positions  # [n, H', W', d]
        norm = np.linalg.norm(per_position.sum(axis=(1, 2)), axis=-1)
        out.append(np.einsum("nhwd,nd->nhw", per_position, embeddings[other])
                   / norm[:, None, None])
    return np.sum(embeddings[0] * embeddings[1], axis=-1), out


@pytest.mark.parametrize("pooling", ["avg", "flatten"])
def test_exact_contributions_add_up_to_the_similarity_and_match_the_head_maths(pooling):
    config = small_config(pooling)
    variables = initial_variables(config)
    explainer = Explainer(config, variables, stage=FINAL)  # four devices, two pairs on each
    assert explainer.method == EXACT and explainer.feature_shape == (4, 4)
    assert explainer.stage == "stage2"
    images_a, images_b = random_images(config, 7, 1), random_images(config, 7, 2)
    similarities, heat_a, heat_b = explainer.explain_uint8(images_a, images_b)
    embed = embedding_function(config)
    e_a, e_b = np.asarray(embed(variables, images_a)), np.asarray(embed(variables, images_b))
    np.testing.assert_allclose(similarities, np.sum(e_a * e_b, axis=-1), atol=1e-5)
    for heat in (heat_a, heat_b):
        np.testing.assert_allclose(heat.sum(axis=(1, 2)), similarities, atol=1e-5)
    if pooling == "avg":
        expected_similarities, expected = head_maths(config, variables, images_a, images_b)
        np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)
        np.testing.assert_allclose(heat_a, expected[0], atol=1e-5)
        np.testing.assert_allclose(heat_b, expected[1], atol=1e-5)


def test_with_mirror_test_time_augmentation_the_heat_still_adds_up():
    config = small_config("avg", flip_test=True)
    variables = initial_variables(config, seed=3)
    images_a, images_b = random_images(config, 3, 4), random_images(config, 3, 5)
    similarities, heat_a, heat_b = Explainer(config, variables, stage=FINAL).explain_uint8(
        images_a, images_b)
    embed = embedding_function(config)
    e_a, e_b = np.asarray(embed(variables, images_a)), np.asarray(embed(variables, images_b))
    np.testing.assert_allclose(similarities, np.sum(e_a * e_b, axis=-1), atol=1e-5)
    for heat in (heat_a, heat_b):
        np.testing.assert_allclose(heat.sum(axis=(1, 2)), similarities, atol=1e-5)


# ----------------------------------------------------------------- stages inside the backbone

def test_stages_come_in_order_and_the_default_is_the_deepest_of_16_or_more_a_side():
    config = small_config("gem", image_size=64, widths=(4, 8, 8))
    # Shapes alone: the variables need not exist.
    abstract = jax.eval_shape(build_model(config).init, jax.random.key(0),
                              jnp.zeros((1, 64, 64, 1)))
    shapes = stage_shapes(config, abstract)
    assert shapes == {"stage1": (32, 32), "stage2": (16, 16), "stage3": (8, 8)}
    assert default_stage(shapes) == "stage2" and check_stage(shapes, None) == "stage2"
    assert check_stage(shapes, FINAL) == "stage3" and check_stage(shapes, "stage1") == "stage1"
    # When every map is smaller, the finest.
    assert default_stage({"stage1": (8, 8), "stage2": (4, 4)}) == "stage1"
    with pytest.raises(JaxRetrievalError, match="stage1, stage2, stage3"):
        check_stage(shapes, "stage4")

    dlib = base_config()
    dlib.image_size, dlib.channels, dlib.model.name = 150, 3, "dlib_face_resnet"
    dlib.model.input_norm, dlib.model.projection_bias, dlib.embedding_dim = "dlib", False, 128
    model = build_model(dlib)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 150, 150, 3)))
    shapes = stage_shapes(dlib, abstract)
    assert shapes == {"stage0": (35, 35), "stage1": (35, 35), "stage2": (17, 17),
                      "stage3": (8, 8), "stage4": (4, 4), "stage5": (2, 2)}
    assert default_stage(shapes) == "stage2"
    assert "intermediates" not in abstract  # recording the stages adds no variables


def test_at_an_inner_stage_the_heat_of_a_homogeneous_model_adds_up_to_the_similarity():
    # Without biases, a network of convolutions, ReLUs, max-pools, an average pool and a
    # linear map is homogeneous of degree one in every stage's feature map, so gradient x
    # activation there adds up to the similarity (Euler's theorem): a check that the heat
    # is the gradient at that stage, times that stage's activation.
    config = small_config("avg", batch_norm=False)
    variables = initial_variables(config, seed=2)
    for layer in variables["params"]["backbone"].values():
        layer["bias"][:] = 0.0
    variables["params"]["projection"]["bias"][:] = 0.0
    images_a, images_b = random_images(config, 3, 6), random_images(config, 3, 7)
    embed = embedding_function(config)
    e_a, e_b = np.asarray(embed(variables, images_a)), np.asarray(embed(variables, images_b))
    explainer = Explainer(config, variables, stage="stage1")
    assert explainer.method == GRAD_X_ACTIVATION and explainer.feature_shape == (8, 8)
    similarities, heat_a, heat_b = explainer.explain_uint8(images_a, images_b)
    np.testing.assert_allclose(similarities, np.sum(e_a * e_b, axis=-1), atol=1e-5)
    assert np.ptp(heat_a) > 1e-3
    for heat in (heat_a, heat_b):
        np.testing.assert_allclose(heat.sum(axis=(1, 2)), similarities, atol=1e-5)


# ----------------------------------------------------------------- a planted shared patch

SIDE = 32
COLOURS = {"red": 0, "green": 1, "blue": 2}


def planted_pair(patch_a, patch_b, seed):
    """Two dark RGB images, with faint noise, sharing one red square (at `patch_a` in the first,
    `patch_b` in the second); each also holds a larger square of its own colour (green in
    the first, blue in the second) that the other lacks."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 32, (2, SIDE, SIDE, 3)).astype(np.uint8)
    for image, (row, col), (own_row, own_col, own) in zip(
            images, (patch_a, patch_b), ((18, 16, "green"), (2, 2, "blue"))):
        image[row:row + 8, col:col + 8, COLOURS["red"]] = 255
        image[own_row:own_row + 12, own_col:own_col + 12, COLOURS[own]] = 255
    return images[:1], images[1:]


def colour_detector(pooling):
    """A one-stage seed CNN whose three channels detect red, green and blue, and a projection
    that keeps the colours apart in the embedding: a model built to respond to the patch."""
    config = small_config(pooling, image_size=SIDE, channels=3, widths=(3,), kernel_size=1,
                          embedding_dim=3, batch_norm=False)
    config.model.input_norm = "centred"
    variables = initial_variables(config)
    params = variables["params"]
    # Centred pixels lie in [-2, 2]: the bias of 1.6 leaves dark pixels at about zero.
    params["backbone"]["Conv_0"]["kernel"][:] = np.eye(3).reshape(1, 1, 3, 3)
    params["backbone"]["Conv_0"]["bias"][:] = 1.6
    params["projection"]["kernel"][:] = np.linalg.qr(
        np.random.default_rng(7).normal(size=(3, 3)))[0]
    params["projection"]["bias"][:] = 0.0
    return config, variables


def peak(heat):
    return np.unravel_index(np.argmax(heat), heat.shape)


@pytest.mark.parametrize("pooling,method", [("avg", EXACT), ("gem", GRAD_X_ACTIVATION)])
def test_the_heat_peaks_on_the_patch_the_two_images_share(pooling, method):
    config, variables = colour_detector(pooling)
    explainer = Explainer(config, variables)
    assert explainer.method == method and explainer.feature_shape == (16, 16)
    for seed, (patch_a, patch_b) in enumerate((((4, 4), (20, 18)), ((22, 6), (6, 22)))):
        images_a, images_b = planted_pair(patch_a, patch_b, seed)
        _, heat_a, heat_b = explainer.explain_uint8(images_a, images_b)
        for heat, (row, col) in ((heat_a[0], patch_a), (heat_b[0], patch_b)):
            assert np.all(np.isfinite(heat))
            # The feature map halves the image: the patch covers 4 x 4 of its cells.
            peak_row, peak_col = peak(heat)
            assert row // 2 <= peak_row < row // 2 + 4 and col // 2 <= peak_col < col // 2 + 4
            patch = np.zeros(heat.shape, bool)
            patch[row // 2:row // 2 + 4, col // 2:col // 2 + 4] = True
            # Every cell of the patch is hotter than anything else: the faint noise, and the
            # bright square the other image lacks.
            assert heat[patch].min() > 3 * heat[~patch].max()


@pytest.mark.parametrize("pooling,stage", [("avg", FINAL), ("gem", None)])
def test_mirroring_the_input_mirrors_the_heat_for_a_model_with_symmetric_kernels(pooling,
                                                                                 stage):
    config = small_config(pooling, batch_norm=False)
    variables = initial_variables(config, seed=5)
    for conv in variables["params"]["backbone"].values():
        conv["kernel"][:] = (conv["kernel"] + conv["kernel"][:, ::-1]) / 2  # [h, w, in, out]
    explainer = Explainer(config, variables, stage=stage)
    assert explainer.feature_shape == ((4, 4) if stage == FINAL else (8, 8))
    images_a, images_b = random_images(config, 3, 8), random_images(config, 3, 9)
    mirror = lambda images: images[:, :, ::-1]
    similarities, heat_a, heat_b = explainer.explain_uint8(images_a, images_b)
    assert np.ptp(heat_a) > 1e-3  # heat that could show a mirror, not a flat map
    mirrored, heat_ma, heat_mb = explainer.explain_uint8(mirror(images_a), images_b)
    np.testing.assert_allclose(mirrored, similarities, atol=1e-5)
    np.testing.assert_allclose(heat_ma, heat_a[:, :, ::-1], atol=1e-5)
    np.testing.assert_allclose(heat_mb, heat_b, atol=1e-5)
    _, heat_ma, heat_mb = explainer.explain_uint8(mirror(images_a), mirror(images_b))
    np.testing.assert_allclose(heat_ma, heat_a[:, :, ::-1], atol=1e-5)
    np.testing.assert_allclose(heat_mb, heat_b[:, :, ::-1], atol=1e-5)


# ----------------------------------------------------------------- Retriever, CLI, service

def digit(index):
    from sklearn.datasets import load_digits

    return np.round(load_digits().images[index] * 255 / 16).astype(np.uint8)


def png_bytes(pixels):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def retriever(trained_workdir):
    from jaxretrieval.retriever import Retriever

    return Retriever.load(trained_workdir[0])


def test_retriever_explains_a_pair_as_it_matches_it(retriever):
    a, b = digit(3), digit(13)
    result = retriever.explain(a, b)
    match = retriever.match(a, b)
    assert result.similarity == pytest.approx(match.similarity, abs=1e-5)
    assert (result.same, result.threshold) == (match.same, match.threshold)
    # The finest stage by default (none of the 16x16 input's maps has 16 a side).
    assert (result.method, result.stage) == (GRAD_X_ACTIVATION, "stage1")
    assert [h.shape for h in result.heatmaps] == [(8, 8), (8, 8)]
    assert [o.shape for o in result.overlays] == [(16, 16, 3), (16, 16, 3)]
    assert all(o.dtype == np.uint8 for o in result.overlays)
    assert retriever.explain(a, b, threshold=2.0).same is False
    assert retriever.explain_stages() == {"stage1": (8, 8), "stage2": (4, 4)}
    final = retriever.explain(a, b, stage=FINAL)
    assert final.stage == "stage2" and final.heatmaps[0].shape == (4, 4)
    assert final.similarity == pytest.approx(result.similarity, abs=1e-5)
    assert final.method == GRAD_X_ACTIVATION  # the default head pools by GeM
    with pytest.raises(JaxRetrievalError, match="stage1, stage2"):
        retriever.explain(a, b, stage="stage9")


@pytest.fixture
def no_compilation_cache(monkeypatch):
    # `cli.main` sets up the process; keep this test process's JAX config as it was.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def test_the_command_line_writes_both_overlays_with_the_verdict(
        trained_workdir, tmp_path, capsys, no_compilation_cache):
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    for path, index in zip(paths, (4, 14)):
        Image.fromarray(digit(index)).save(path)
    output = str(tmp_path / "out" / "overlay.png")
    code = cli.main(["explain", "--workdir", trained_workdir[0], *paths, "--output", output,
                     "--side", "128"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["method"] == GRAD_X_ACTIVATION and printed["output"] == output
    assert printed["stage"] == "stage1" and printed["heatmap"] == [8, 8]
    assert -1.0 <= printed["similarity"] <= 1.0 and printed["same"] in (True, False)
    with Image.open(output) as picture:
        assert picture.format == "PNG" and picture.width == 3 * 8 + 2 * 128
        pixels = np.asarray(picture.convert("RGB"), np.int32)
    # Both overlays carry colour, not only grey.
    for left in (8, 8 + 128 + 8):
        tile = pixels[-8 - 128:-8, left:left + 128]
        assert np.abs(tile[..., 0] - tile[..., 2]).max() > 40
    assert cli.main(["explain", "--workdir", trained_workdir[0], paths[0],
                     str(tmp_path / "missing.png"), "--output", output]) == 1
    assert "not found" in capsys.readouterr().err
    assert cli.main(["explain", "--workdir", trained_workdir[0], *paths, "--output", output,
                     "--stage", "conv9"]) == 1
    assert "stage1, stage2" in capsys.readouterr().err


@pytest.fixture(scope="module")
def client(trained_workdir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from jaxretrieval.retriever import Retriever
    from jaxretrieval.service.app import ServiceSettings, create_app

    workdir = str(tmp_path_factory.mktemp("explain") / "wd")
    shutil.copytree(trained_workdir[0], workdir)
    retriever = Retriever.load(workdir)
    settings = ServiceSettings(data_dir=retriever.embedder.config.data_dir,
                               allowed_hosts=("testserver",))  # TestClient's Host
    with TestClient(create_app(retriever, settings)) as client:
        yield client


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["message"]


def decoded_overlays(body):
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in
              body["overlays"]]
    assert [image.shape for image in images] == [(16, 16, 3), (16, 16, 3)]
    return images


def test_explain_endpoint_answers_two_images_and_an_image_with_a_gallery_id(client):
    files = {"image_a": ("a.png", png_bytes(digit(5)), "image/png"),
             "image_b": ("b.png", png_bytes(digit(15)), "image/png")}
    response = client.post("/explain", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == GRAD_X_ACTIVATION and -1 <= body["similarity"] <= 1
    matched = client.post("/match", files=files).json()
    assert body["similarity"] == pytest.approx(matched["similarity"], abs=1e-5)
    assert (body["same"], body["threshold"]) == (matched["same"], matched["threshold"])
    assert body["stage"] == "stage1" and np.asarray(body["heatmaps"]).shape == (2, 8, 8)
    decoded_overlays(body)
    final = client.post("/explain?stage=final", files=files).json()
    assert final["stage"] == "stage2" and np.asarray(final["heatmaps"]).shape == (2, 4, 4)

    # The digit as stored is train/5's own image: the pair is one image twice.
    by_id = client.post("/explain", data={"id": "train/5"},
                        files={"image": ("q.png", png_bytes(digit(5)), "image/png")})
    assert by_id.status_code == 200, by_id.text
    body = by_id.json()
    assert body["similarity"] == pytest.approx(1.0, abs=1e-4) and body["same"] is True
    heat_a, heat_b = np.asarray(body["heatmaps"])
    np.testing.assert_allclose(heat_a, heat_b, atol=1e-5)
    overlay_a, overlay_b = decoded_overlays(body)
    np.testing.assert_array_equal(overlay_a, overlay_b)
    strict = client.post("/explain?threshold=1.5", data={"id": "train/5"},
                         files={"image": ("q.png", png_bytes(digit(5)), "image/png")})
    assert strict.json()["same"] is False and strict.json()["threshold"] == 1.5


def test_explain_endpoint_refuses_bad_input_in_the_error_shape(client):
    image = ("q.png", png_bytes(digit(1)), "image/png")
    assert_error(client.post("/explain", data={"id": "no/such/item"}, files={"image": image}),
                 404, "unknown_id")
    assert_error(client.post("/explain", files={"image_a": image}), 400, "missing_field")
    assert_error(client.post("/explain", files={"image_a": image,
                                                "image_b": ("b.png", b"not an image",
                                                            "image/png")}),
                 400, "bad_image")
    assert_error(client.post("/explain", json={"image_a": "x"}), 400, "missing_field")
    assert_error(client.post("/explain", files={"id": (None, "train/1")}), 400, "missing_field")
    assert_error(client.post("/explain?stage=stage7", files={"image_a": image, "image_b": image}),
                 400, "bad_stage")
    schema = client.get("/openapi.json").json()["paths"]["/explain"]["post"]
    assert "overlays" in schema["description"] and schema["summary"]


def test_the_page_explains_a_search_result_and_the_match_in_chromium(trained_workdir,
                                                                      tmp_path):
    from test_service_process import CHROMEDRIVER, CHROMIUM, Server

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)) and not os.environ.get(
            "JAXRETRIEVAL_REQUIRE_BROWSER"):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    workdir = str(tmp_path / "wd")
    shutil.copytree(trained_workdir[0], workdir)
    query, other = str(tmp_path / "five.png"), str(tmp_path / "fifteen.png")
    Image.fromarray(digit(5)).save(query)
    Image.fromarray(digit(15)).save(other)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    server = Server(workdir)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)

    def overlays_shown(d):
        return d.execute_script(
            "const imgs = [...document.querySelectorAll('#explain-overlays img')];"
            "return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0)")

    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "items" in d.find_element(By.ID, "health").text)
        driver.find_element(By.ID, "search-file").send_keys(query)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .why-button")) == 10)
        driver.find_elements(By.CSS_SELECTOR, "#results .why-button")[1].click()
        wait.until(overlays_shown)
        status = driver.find_element(By.ID, "explain-status").text
        assert status.startswith("the query and ") and "similarity" in status

        driver.find_element(By.ID, "a-file").send_keys(query)
        driver.find_element(By.ID, "b-file").send_keys(other)
        wait.until(lambda d: d.find_element(By.ID, "explain-status").text.startswith(
            "the match: similarity"))
        wait.until(overlays_shown)
        verdict = driver.find_element(By.ID, "verdict").text
        similarity = verdict.split(":")[0].split()[-1]
        assert similarity in driver.find_element(By.ID, "explain-status").text
        driver.execute_script("document.getElementById('verdict').closest('section')"
                              ".scrollIntoView()")
        shot = os.environ.get("JAXRETRIEVAL_EXPLAIN_SCREENSHOT", str(tmp_path / "explain.png"))
        assert driver.save_screenshot(shot) and os.path.getsize(shot) > 10_000
    finally:
        driver.quit()
        server.stop()
