"""int8 post-training quantisation (`compress --method int8`): the embeddings stay close to
float32's, the model is stored in int8, exported as int8, and not explained. That the
compressed workdir loads and searches is tested with every method's (test_compress.py)."""

import os

import numpy as np
import pytest

# Every image's int8 embedding has at least this cosine with its float32 one (the measured
# values, well above it, are in docs/compression.md).
MIN_COSINE = 0.97


@pytest.fixture(scope="module")
def int8_workdir(trained_workdir, tmp_path_factory):
    from jaxretrieval.compress import compress_workdir

    output = str(tmp_path_factory.mktemp("int8") / "wd")
    record = compress_workdir(trained_workdir[0], output, "int8", {"calibration_images": 64})
    return output, record


def test_int8_embeddings_stay_close_to_float32(trained_workdir, int8_workdir):
    from jaxretrieval.export import load_embedding_export
    from jaxretrieval.workdir import Workdir

    source = load_embedding_export(Workdir(trained_workdir[0]).embeddings)
    quantised = load_embedding_export(Workdir(int8_workdir[0]).embeddings)
    assert quantised.keys == source.keys
    cosines = np.sum(source.embeddings * quantised.embeddings, axis=1)
    assert cosines.min() >= MIN_COSINE, cosines.min()
    # The int8 program really ran: the embeddings are not float32's.
    assert np.abs(source.embeddings - quantised.embeddings).max() > 1e-4


def test_int8_model_is_stored_in_int8(int8_workdir):
    from jaxretrieval.embed import restore_model

    output, record = int8_workdir
    # A quarter of the kernels' bytes; the tiny model's float32 BatchNorm, biases and scales
    # are a larger share of it than of a real one (0.26 of configs/default.py's model).
    assert record["model_bytes"] < 0.4 * record["source_model_bytes"]
    _, variables, _ = restore_model(output)
    kernels = [leaf for path, leaf in _leaves(variables["params"]) if "kernel" in path]
    assert kernels and all(kernel["qvalue"].dtype == np.int8 for kernel in kernels)
    scales = [leaf for path, leaf in _leaves(variables["params"]) if path[-1].endswith(
        "_lhs_scale")]
    assert len(scales) == len(kernels)  # one calibrated activation scale per layer
    assert all(np.all(np.asarray(scale) > 0) for scale in scales)


def test_int8_model_exports_and_refuses_explanations(int8_workdir, tmp_path):
    from jax import export

    from jaxretrieval.embed import Embedder
    from jaxretrieval.errors import JaxRetrievalError
    from jaxretrieval.explain import Explainer
    from jaxretrieval.model_export import export_model

    output, _ = int8_workdir
    embedder = Embedder.from_workdir(output)
    with pytest.raises(JaxRetrievalError, match="not available for an int8 model"):
        Explainer.from_embedder(embedder)
    path = str(tmp_path / "exported")
    export_model(output, "stablehlo", path)
    with open(os.path.join(path, "model.stablehlo"), "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    assert "xi8>" in exported.mlir_module()  # int8 arithmetic in the exported program
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(exported.call(images)),
                               embedder.embed_uint8(images), atol=1e-5)


def _leaves(tree, path=()):
    for name, node in tree.items():
        if isinstance(node, dict) and "qvalue" not in node:
            yield from _leaves(node, path + (name,))
        else:
            yield path + (name,), node


def test_the_service_answers_501_for_an_int8_models_explanation(int8_workdir):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from jaxretrieval.retriever import Retriever
    from jaxretrieval.service.app import ServiceSettings, create_app

    def png(value):
        out = io.BytesIO()
        Image.new("L", (16, 16), value).save(out, format="PNG")
        return out.getvalue()

    retriever = Retriever.load(int8_workdir[0])
    try:
        settings = ServiceSettings(allowed_hosts=("testserver",))  # TestClient's Host
        with TestClient(create_app(retriever, settings)) as client:
            files = {"image_a": ("a.png", png(40), "image/png"),
                     "image_b": ("b.png", png(200), "image/png")}
            answer = client.post("/explain", files=files)
            assert answer.status_code == 501, answer.text
            assert answer.json()["error"]["code"] == "not_implemented"
            assert "int8" in answer.json()["error"]["message"]
    finally:
        retriever.close()
