"""The HTTP service, in process: endpoints, errors, API key, metrics, micro-batching."""

import ast
import io
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from jaxretrieval.retriever import Retriever
from jaxretrieval.service.app import ServiceSettings, create_app
from jaxretrieval.service.batching import MicroBatcher, QueueFull

API_KEY = "s3cret"


def digit_png(index):
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images[index] * 255 / 16).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def service(trained_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("service") / "wd")
    shutil.copytree(trained_workdir[0], workdir)
    retriever = Retriever.load(workdir, writable=True)
    settings = ServiceSettings(api_key=API_KEY, max_k=50, max_upload_bytes=200_000,
                               max_pixels=1_000_000, data_dir=retriever.embedder.config.data_dir,
                               allowed_hosts=("testserver",))  # TestClient's Host
    with TestClient(create_app(retriever, settings)) as client:
        yield client, retriever


def assert_error(response, status, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code


def test_search_by_image_and_by_embedding(service):
    client, retriever = service
    response = client.post("/search?k=5", files={"image": ("q.png", digit_png(5), "image/png")})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 5 and results[0]["id"] == "train/5"
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    vector = retriever.embed([np.asarray(Image.open(io.BytesIO(digit_png(7))))[..., None]])[0]
    by_vector = client.post("/search?k=3", json={"embedding": vector.tolist()}).json()
    assert by_vector["results"][0]["id"] == "train/7"
    cut = by_vector["results"][1]["score"] + 1e-6
    short = client.post(f"/search?k=3&threshold={cut}", json={"embedding": vector.tolist()})
    assert [r["id"] for r in short.json()["results"]] == ["train/7"]


def test_match_two_images(service):
    client, retriever = service
    files = {"image_a": ("a.png", digit_png(3), "image/png"),
             "image_b": ("b.png", digit_png(3), "image/png")}
    body = client.post("/match", files=files).json()
    assert body["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert body["same"] is True and body["threshold"] == retriever.match_threshold


def test_items_are_added_replaced_and_deleted_with_the_key(service):
    client, retriever = service
    count = client.get("/healthz").json()["items"]
    vector = np.zeros(retriever.index.embedding_dim, np.float32)
    vector[0] = 1.0
    headers = {"X-API-Key": API_KEY}
    assert_error(client.post("/items", json={"items": [{"id": "new/1", "embedding":
                                                        vector.tolist()}]}), 401, "unauthorized")
    added = client.post("/items", headers=headers,
                        json={"items": [{"id": "new/1", "embedding": vector.tolist()}]})
    assert added.status_code == 200 and added.json()["items"] == count + 1
    top = client.post("/search?k=1", json={"embedding": vector.tolist()}).json()["results"][0]
    assert top["id"] == "new/1" and top["score"] == pytest.approx(1.0, abs=1e-5)
    # Multipart: an image under an existing id replaces that item's vector.
    replaced = client.post("/items", headers=headers,
                           data={"id": "new/1"},
                           files={"image": ("x.png", digit_png(9), "image/png")})
    assert replaced.status_code == 200 and replaced.json()["items"] == count + 1
    top = client.post("/search?k=1", json={"embedding": vector.tolist()}).json()["results"][0]
    assert top["id"] != "new/1" or top["score"] < 0.999
    assert_error(client.delete("/items/new/1"), 401, "unauthorized")
    assert client.delete("/items/new/1", headers=headers).json()["items"] == count
    assert_error(client.delete("/items/new/1", headers=headers), 404, "unknown_id")


def test_thumbnail_health_metrics_page_and_docs(service):
    client, _ = service
    thumbnail = client.get("/items/train/5/thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumbnail.content)).size[0] >= 64
    assert_error(client.get("/items/nope/thumbnail"), 404, "unknown_id")
    assert client.get("/healthz").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    for series in ("jaxretrieval_requests_total", "jaxretrieval_request_latency_seconds_bucket",
                   "jaxretrieval_embed_batch_size_bucket", "jaxretrieval_index_items",
                   "jaxretrieval_request_errors_total"):
        assert series in metrics
    assert "<title>jaxretrieval</title>" in client.get("/").text
    assert "/search" in client.get("/openapi.json").json()["paths"]
    assert_error(client.get("/no/such/route"), 404, "not_found")


def malformed_requests(dim):
    """(description, callable(client) -> response, expected status) for bad input."""
    png = digit_png(1)
    truncated = png[: len(png) // 2]
    bomb = io.BytesIO()
    Image.new("L", (2000, 2000)).save(bomb, format="PNG")  # 4M pixels > the 1M limit
    bomb = bomb.getvalue()
    big = b"\x89PNG" + b"\0" * 300_000
    key = {"X-API-Key": API_KEY}
    return [
        ("not an image", lambda c: c.post("/search", files={"image": ("x", b"hello", "a/b")}), 400),
        ("truncated png", lambda c: c.post("/search", files={"image": ("x", truncated, "a")}), 400),
        ("bomb", lambda c: c.post("/search", files={"image": ("x", bomb, "image/png")}), 400),
        ("too large", lambda c: c.post("/search", files={"image": ("x", big, "image/png")}), 413),
        ("empty file", lambda c: c.post("/search", files={"image": ("x", b"", "image/png")}), 400),
        ("wrong dim", lambda c: c.post("/search", json={"embedding": [0.1] * (dim + 1)}), 400),
        ("nan", lambda c: c.post("/search", content=("{\"embedding\": [" + ", ".join(
            ["NaN"] * dim) + "]}").encode(), headers={"content-type": "application/json"}), 400),
        ("k zero", lambda c: c.post("/search?k=0", json={"embedding": [1.0] * dim}), 400),
        ("k over", lambda c: c.post("/search?k=51", json={"embedding": [1.0] * dim}), 400),
        ("k text", lambda c: c.post("/search?k=many", json={"embedding": [1.0] * dim}), 422),
        ("missing field", lambda c: c.post("/search", json={"vector": [1.0]}), 400),
        ("missing file", lambda c: c.post("/search", files={"other": ("x", png, "a")}), 400),
        ("bad json", lambda c: c.post("/search", content=b"{oops",
                                      headers={"content-type": "application/json"}), 400),
        ("match one image", lambda c: c.post("/match", files={"image_a": ("a", png, "a")}), 400),
        ("unknown id", lambda c: c.delete("/items/none", headers=key), 404),
        ("wrong key", lambda c: c.delete("/items/train/1", headers={"X-API-Key": "no"}), 401),
        ("unpaired items", lambda c: c.post("/items", headers=key, data={"id": ["a", "b"]},
                                            files={"image": ("x", png, "a")}), 400),
        ("items not a list", lambda c: c.post("/items", headers=key, json={"items": 3}), 400),
    ]


def test_hundreds_of_malformed_requests_leave_the_service_serving(service):
    import resource

    client, retriever = service
    cases = malformed_requests(retriever.index.embedding_dim)

    def one_round():
        for name, send, status in cases:
            response = send(client)
            assert response.status_code == status, (name, response.text)
            assert response.json()["error"]["code"], name

    for _ in range(6):  # warm every path up
        one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(12):  # 18 cases x 12 = 216 more malformed requests
        one_round()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, f"peak memory grew {grown_mb:.0f} MB over 216 bad requests"
    ok = client.post("/search?k=1", files={"image": ("q.png", digit_png(5), "image/png")})
    assert ok.json()["results"][0]["id"] == "train/5"
    assert retriever.index.count == 1797


def test_micro_batcher_gathers_concurrent_queries_into_one_call():
    calls = []

    def slow_embed(images):
        calls.append(len(images))
        time.sleep(0.05)
        return images.reshape(len(images), -1).astype(np.float32)

    batcher = MicroBatcher(slow_embed, max_batch=8, max_wait_ms=20, max_queue=64)
    results = {}

    def query(i):
        results[i] = batcher.submit(np.full((1, 2, 2, 1), i, np.uint8)).result(timeout=10)

    threads = [threading.Thread(target=query, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert sum(calls) == 8 and max(calls) > 1  # fewer calls than queries
    for i in range(8):  # each caller gets its own embedding back
        np.testing.assert_array_equal(results[i], np.full((1, 4), i, np.float32))


def test_micro_batcher_refuses_work_beyond_its_queue():
    release = threading.Event()

    def blocked_embed(images):
        release.wait(10)
        return np.zeros((len(images), 1), np.float32)

    batcher = MicroBatcher(blocked_embed, max_batch=1, max_wait_ms=0, max_queue=2)
    first = batcher.submit(np.zeros((1, 1, 1, 1), np.uint8))
    time.sleep(0.1)  # the worker holds the first; the queue has room for 2 more
    batcher.submit(np.zeros((2, 1, 1, 1), np.uint8))
    with pytest.raises(QueueFull):
        batcher.submit(np.zeros((1, 1, 1, 1), np.uint8))
    release.set()
    assert first.result(timeout=10).shape == (1, 1)
    batcher.close()


def test_an_oversized_request_is_refused_before_it_is_read(service):
    client, _ = service
    huge = b"0" * (200_000 * 32 + (1 << 20) + 1)  # over max_upload_bytes x max_batch + 1 MiB
    response = client.post("/items", headers={"X-API-Key": API_KEY},
                           files={"image": ("x.png", huge, "image/png")}, data={"id": "big"})
    assert_error(response, 413, "too_large")


def test_the_service_reaches_the_model_and_the_index_only_through_the_retriever():
    import jaxretrieval.service

    package = os.path.dirname(jaxretrieval.service.__file__)
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(package, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                modules = []
            for module in modules:
                assert not module.startswith("jaxretrieval.data"), (name, module)
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("index", "embedder"), (
                    f"{name}:{node.lineno} reaches .{node.attr}: go through Retriever methods")


def test_the_access_log_has_a_line_per_request(caplog):
    from fastapi import FastAPI

    from jaxretrieval.service.app import ACCESS_LOGGER, log_request
    from jaxretrieval.service.metrics import ObserveRequests

    app = FastAPI()
    app.get("/ping")(lambda: {"ok": True})
    app.add_middleware(ObserveRequests, observe=log_request)
    with caplog.at_level("INFO", logger=ACCESS_LOGGER), TestClient(app) as client:
        assert client.get("/ping?x=1").status_code == 200
        assert client.get("/missing").status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 2
    assert re.fullmatch(r"GET /ping\?x=1 200 \d+\.\d ms", lines[0])
    assert re.fullmatch(r"GET /missing 404 \d+\.\d ms", lines[1])

