"""Hostile data on the way in: item ids, embedding values, and ids already stored that break
the rules. The service runs over a real index and a stand-in model (the JSON endpoints never
embed an image), so these tests need no training."""

import json
import types
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import tiny_config
import jaxretrieval.index
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import Index, ShardedIndex, snapshot_directory, wal
from jaxretrieval.retriever import Retriever
from jaxretrieval.service.app import ServiceSettings, create_app

DIM = 8
BAD_IDS = ["\ud800", "", "a\x00b", "line\nbreak", "\x7f", "next\x85line", "x" * 1025,
           "\u00e9" * 513]
# Valid, and awkward in a URL path or in JSON.
AWKWARD_IDS = ["a/b", "a%2Fb", "x?y#z", "100%", "%", "..", ".", "a/../b", "/lead", "trail/",
               "a//b", " spaced ", "\u00e9t\u00e9", "\U0001f600", "zero\u200dwidth",
               "\\ud800", "k" * 1024, "a/thumbnail"]


def shown_key(key):
    # Looked up when called, so that this file also runs against code without it.
    return jaxretrieval.index.shown_key(key)


def axis(number, dim=DIM):
    vector = np.zeros(dim, np.float32)
    vector[number % dim] = 1.0
    return vector


def build_index(count=20):
    rows = np.random.default_rng(0).normal(size=(count, DIM))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return Index.build(rows, [f"item-{row}" for row in range(count)], checkpoint_step=1,
                       model_config_hash="abc")


def stand_in_retriever(index):
    embedder = types.SimpleNamespace(embedding_dim=DIM, config=tiny_config(""),
                                     embed_uint8=lambda images: None)
    return Retriever(embedder, index)


def client_over(retriever):
    return TestClient(create_app(retriever, ServiceSettings(max_k=50)))


def url_id(item_id):
    """An id in a URL path: every reserved character percent-encoded, and dots too, since
    clients resolve the path segments `.` and `..` before sending."""
    return quote(item_id, safe="").replace(".", "%2E")


def raw_json(body):
    """JSON text as a client may send it: lone surrogates as \\u escapes."""
    return {"content": json.dumps(body).encode("ascii"),
            "headers": {"content-type": "application/json"}}


# ---------------------------------------------------------------------- ids

@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_breaking_the_rules_are_refused_by_python_and_http(bad):
    index = build_index()
    for call in (lambda: index.upsert([bad], axis(0)[None]),
                 lambda: ShardedIndex.build(np.stack([axis(0), axis(1)]), ["fine", bad],
                                            checkpoint_step=1, model_config_hash="abc",
                                            num_shards=2),
                 lambda: stand_in_retriever(index).upsert_embeddings([bad], axis(0)[None])):
        with pytest.raises(JaxRetrievalError, match="a key \\(item id\\) must be non-empty"):
            call()
    assert index.count == 20
    with client_over(stand_in_retriever(index)) as client:
        response = client.post("/items", **raw_json(
            {"items": [{"id": "fine", "embedding": axis(0).tolist()},
                       {"id": bad, "embedding": axis(1).tolist()}]}))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "bad_id" and "at row 1" in error["message"]
        assert "at most 1024 bytes in UTF-8" in error["message"]
    assert index.count == 20 and "fine" not in index


def test_awkward_valid_ids_are_searchable_and_deletable_over_http():
    index = build_index()
    retriever = stand_in_retriever(index)
    items = [{"id": item_id, "embedding": (axis(row) * 3).tolist()}
             for row, item_id in enumerate(AWKWARD_IDS)]
    with client_over(retriever) as client:
        added = client.post("/items", **raw_json({"items": items}))
        assert added.status_code == 200, added.text
        found = client.post("/search?k=50", json={"embedding": axis(0).tolist()})
        assert found.status_code == 200
        assert set(AWKWARD_IDS) <= {hit["id"] for hit in found.json()["results"]}
        for item_id in AWKWARD_IDS:
            response = client.delete(f"/items/{url_id(item_id)}")
            assert response.status_code == 200, (item_id, response.text)
            assert response.json()["deleted"] == item_id and item_id not in index
    assert index.count == 20


def write_ids_past_the_rules(directory, ids):
    """Logs an upsert of `ids` straight into the index's write-ahead log, as a version
    without the id rules did."""
    record = {"op": "upsert", "keys": ids, "sources": None,
              "embeddings": wal.encode_vectors(np.stack([axis(row) for row in range(len(ids))]))}
    with open(f"{snapshot_directory(directory)}/{wal.LOG_FILE}", "ab") as log:
        log.write(wal.encode_record(record))


def test_an_index_already_holding_bad_ids_loads_searches_and_deletes_them(tmp_path):
    directory = tmp_path / "index"
    build_index().save(directory)
    write_ids_past_the_rules(directory, ["\ud800", "line\nbreak", "low\udc00high\ud800"])
    index = Index.load(directory, writable=True)
    assert "\ud800" in index and index.count == 23
    retriever = stand_in_retriever(index)
    with client_over(retriever) as client:
        found = client.post("/search?k=1", json={"embedding": axis(0).tolist()})
        assert found.status_code == 200, found.text
        assert found.json()["results"][0]["id"] == "\\ud800" == shown_key("\ud800")
        index.snapshot()  # the stored keys survive a snapshot
        for stored in ("low\udc00high\ud800", "line\nbreak"):
            deleted = client.delete("/items/" + url_id(shown_key(stored)))
            assert deleted.status_code == 200, deleted.text
    retriever.delete(["\\ud800"])  # Python takes the shown form too, or the key itself
    assert index.count == 20
    index.close()
    assert Index.load(directory).count == 20


def test_a_valid_id_that_looks_like_a_shown_one_is_matched_first():
    index = build_index()
    index.upsert(["\\udc00"], axis(0)[None])
    with pytest.raises(JaxRetrievalError):
        index.upsert(["\udc00"], axis(1)[None])
    retriever = stand_in_retriever(index)
    retriever.delete(["\\udc00"])
    assert "\\udc00" not in index and index.count == 20


# ---------------------------------------------------------------------- embedding values

def test_embeddings_near_float32s_limit_are_normalised_without_overflow():
    index = build_index()
    index.upsert(["x-axis"], axis(0)[None])
    with client_over(stand_in_retriever(index)) as client:
        for scale in (1e38, 3e38, 1e-38, 1e-44):
            response = client.post("/search?k=1", json={"embedding": (axis(0) * scale).tolist()})
            assert response.status_code == 200, response.text
            top = response.json()["results"][0]
            assert top["id"] == "x-axis" and top["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("value, message", [
    (True, "bool"), ("1.5", "str"), (None, "NoneType"), ([1.0], "list"),
    pytest.param(10 ** 400, "too large", id="400-digit-int"), (1e39, "float32's range")])
def test_embedding_values_must_be_json_numbers_in_range(value, message):
    index = build_index()
    values = [value] + [0.5] * (DIM - 1)
    with client_over(stand_in_retriever(index)) as client:
        for response in (client.post("/search", **raw_json({"embedding": values})),
                         client.post("/items", **raw_json(
                             {"items": [{"id": "new", "embedding": values}]}))):
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "bad_embedding" and message in error["message"]
    assert "new" not in index


def test_the_python_api_refuses_booleans_and_strings_as_embeddings():
    index = build_index()
    one_hot = np.zeros((1, DIM), bool)
    one_hot[0, 0] = True
    with pytest.raises(JaxRetrievalError, match="dtype bool"):
        index.upsert(["new"], one_hot)
    with pytest.raises(JaxRetrievalError, match="hold str"):
        index.upsert(["new"], [["1"] + ["0"] * (DIM - 1)])
    with pytest.raises(JaxRetrievalError, match="hold bool"):
        index.search([[True] + [0.0] * (DIM - 1)], 1)
    assert "new" not in index
