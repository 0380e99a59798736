"""Item metadata and filtered search: the results equal brute force over the passing items
(flat and sharded, both strategies, with pending changes), metadata survives save, load,
log replay and recovery, a delete removes it, bad metadata and filters give one clear
error each, and the service and the CLI carry both."""

import json
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jaxretrieval import cli
from jaxretrieval.index import (BadFilterError, BadMetadataError, Index, ShardedIndex, filtered,
                                open_index, recover, scann_adapter, snapshot_directory)
from jaxretrieval.retriever import Retriever
from jaxretrieval.service.app import ServiceSettings, create_app

DIM = 16
COUNT = 20_000
K = 10
IDENTITY = {"checkpoint_step": 1, "model_config_hash": "abc"}
# Shares of the gallery each label has: filters on them pass 50%, 5% and 0.1%.
LABELS = {"half": 0.5, "twentieth": 0.05, "thousandth": 0.001}


def unit_rows(count, seed, dim=DIM):
    rows = np.random.default_rng(seed).normal(size=(count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_metadata(count, seed):
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    labels = np.full(count, "other", object)
    start = 0
    for label, share in LABELS.items():
        size = round(share * count)
        labels[order[start:start + size]] = label
        start += size
    metadata = []
    for row in range(count):
        if row % 97 == 0:
            metadata.append(None)  # some items carry none
            continue
        item = {"label": labels[row], "year": int(2020 + row % 5)}
        if row % 3 == 0:
            item["tags"] = ["red", "big"] if row % 2 else ["blue"]
        metadata.append(item)
    return metadata


def passes(item, conditions):
    """The filter rule, written out independently of the index's code."""
    if item is None:
        return False
    for field, condition in conditions.items():
        wanted = condition["in"] if isinstance(condition, dict) else [condition]
        if field not in item:
            return False
        held = item[field] if isinstance(item[field], list) else [item[field]]
        if not any(type(a) is type(b) and a == b for a in held for b in wanted):
            return False
    return True


FILTERS = [
    {"label": "half"},
    {"label": "twentieth"},
    {"label": "thousandth"},
    {"label": {"in": ["twentieth", "thousandth"]}},
    {"label": "half", "year": {"in": [2021, 2023]}},
    {"tags": "red", "year": 2024},
    {"label": "nobody"},
]


def brute_force(model, queries, conditions, k):
    """Exact cosine top k over the items of `model` ({key: (vector, metadata)}) that pass."""
    keys = [key for key, (_, item) in model.items() if passes(item, conditions)]
    if not keys:
        return [[] for _ in queries], [[] for _ in queries]
    vectors = np.stack([model[key][0] for key in keys]).astype(np.float64)
    scores = queries.astype(np.float64) @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ([[keys[i] for i in row] for row in order],
            [scores[q, row].tolist() for q, row in enumerate(order)])


def assert_same_as_brute_force(index, model, queries, conditions, k=K):
    keys, scores, metadata = index.search(queries, k, filter=conditions, with_metadata=True)
    expected_keys, expected_scores = brute_force(model, queries, conditions, k)
    for q in range(len(queries)):
        assert len(keys[q]) == len(expected_keys[q]), conditions
        np.testing.assert_allclose(scores[q], expected_scores[q], atol=1e-5)
        if keys[q] != expected_keys[q]:
            # Ties aside: any difference lies between scores equal within rounding.
            differing = [i for i, (a, b) in enumerate(zip(keys[q], expected_keys[q])) if a != b]
            assert all(abs(expected_scores[q][i] - expected_scores[q][max(0, i - 1)]) < 1e-5
                       or abs(expected_scores[q][i] - expected_scores[q][min(i + 1, k - 1)])
                       < 1e-5 for i in differing), (conditions, keys[q], expected_keys[q])
        for key, item in zip(keys[q], metadata[q]):
            assert item == model[key][1] and passes(item, conditions)


@pytest.fixture(scope="module")
def gallery():
    vectors = unit_rows(COUNT, 0)
    keys = [f"item-{row}" for row in range(COUNT)]
    metadata = make_metadata(COUNT, 1)
    model = {key: (vectors[row], metadata[row]) for row, key in enumerate(keys)}
    return vectors, keys, metadata, model


def changed(index, model):
    """Pending changes on top of the build: upserts (new, replaced, metadata dropped) and
    deletes, applied to the index and to `model` alike."""
    model = dict(model)
    new_keys = [f"new-{n}" for n in range(150)] + [f"item-{n}" for n in range(0, 600, 4)]
    vectors = unit_rows(len(new_keys), 7)
    metadata = [None if n % 10 == 0 else {"label": ["half", "twentieth", "thousandth"][n % 3],
                                           "year": 2024} for n in range(len(new_keys))]
    index.upsert(new_keys, vectors, metadata=metadata)
    model.update({key: (vectors[n], metadata[n]) for n, key in enumerate(new_keys)})
    deleted = [f"item-{n}" for n in range(1, 900, 9)]
    index.delete(deleted)
    for key in deleted:
        del model[key]
    return model


@pytest.fixture(scope="module")
def flat(gallery):
    vectors, keys, metadata, model = gallery
    index = Index.build(vectors, keys, metadata=metadata, **IDENTITY)
    return index, changed(index, model)


@pytest.fixture(scope="module")
def sharded(gallery):
    vectors, keys, metadata, model = gallery
    index = ShardedIndex.build(vectors, keys, metadata=metadata, num_shards=3, **IDENTITY)
    return index, changed(index, model)


@pytest.mark.parametrize("layout", ["flat", "sharded"])
@pytest.mark.parametrize("strategy", ["by share", "over-fetch"])
def test_filtered_search_equals_brute_force(layout, strategy, request, monkeypatch):
    index, model = request.getfixturevalue(layout)
    if strategy == "over-fetch":
        # Every filter then goes through ScaNN's candidates, grown until k pass.
        monkeypatch.setattr(filtered, "FILTER_EXACT_MAX_ROWS", 0)
        monkeypatch.setattr(filtered, "OVERFETCH_MAX_FRACTION", float("inf"))
    if layout == "flat":
        assert index.pending  # so the delta and the tombstones are searched too
    queries = unit_rows(12, 3)
    for conditions in FILTERS:
        assert_same_as_brute_force(index, model, queries, conditions)
    assert_same_as_brute_force(index, model, queries[:1], {"label": "thousandth"}, k=500)
    plan = index.filter_plan({"label": "twentieth"})
    assert plan["passing"] == sum(passes(item, {"label": "twentieth"})
                                  for _, item in model.values())
    assert plan["strategy"] == ("exact" if strategy == "by share" else "over-fetch")


def test_over_fetching_from_an_approximate_searcher(monkeypatch):
    monkeypatch.setattr(scann_adapter, "EXACT_SEARCH_MAX_COUNT", 500)
    vectors, keys = unit_rows(4000, 11), [f"k{row}" for row in range(4000)]
    metadata = [{"label": "half" if row % 2 else "rare" if row % 100 == 0 else "other"}
                for row in range(4000)]
    index = Index.build(vectors, keys, metadata=metadata, **IDENTITY)
    assert index.manifest["scann"]["mode"] == "tree_ah"
    model = {key: (vectors[row], metadata[row]) for row, key in enumerate(keys)}
    queries = unit_rows(20, 12)
    monkeypatch.setattr(filtered, "FILTER_EXACT_MAX_ROWS", 100)
    # Selective: brute force over the 40 passing rows, so exact.
    assert_same_as_brute_force(index, model, queries, {"label": "rare"})
    # Half the gallery passes: candidates from the tree, k of them passing, high recall.
    found, _ = index.search(queries, K, filter={"label": "half"})
    expected, _ = brute_force(model, queries, {"label": "half"}, K)
    assert all(len(row) == K and all(key in model and passes(model[key][1], {"label": "half"})
                                     for key in row) for row in found)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, expected)])
    unfiltered, _ = index.search(queries, K)
    everything = {key: (vector, {"all": 1}) for key, (vector, _) in model.items()}
    exact, _ = brute_force(everything, queries, {"all": 1}, K)
    unfiltered_recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(unfiltered, exact)])
    assert recall >= unfiltered_recall - 0.02


def test_metadata_survives_save_load_log_replay_and_a_snapshot(tmp_path):
    for layout, build in [("flat", lambda *a, **kw: Index.build(*a, **kw)),
                          ("sharded", lambda *a, **kw: ShardedIndex.build(*a, num_shards=2,
                                                                          **kw))]:
        directory = tmp_path / layout
        build(unit_rows(50, 0), [f"item-{n}" for n in range(50)],
              metadata=[{"label": "cat", "n": n} if n % 2 else None for n in range(50)],
              **IDENTITY).save(directory)
        assert open_index(directory).metadata_of("item-3") == {"label": "cat", "n": 3}
        with open_index(directory, writable=True) as index:
            index.upsert(["new-1", "item-3", "item-5"], unit_rows(3, 1),
                         metadata=[{"label": "dog", "tags": ["a", "b"]},
                                   {"label": "dog", "score": 0.5}, None])
            index.delete(["item-7"])
        reopened = open_index(directory)  # the log replayed
        assert reopened.metadata_of("new-1") == {"label": "dog", "tags": ["a", "b"]}
        assert reopened.metadata_of("item-3") == {"label": "dog", "score": 0.5}
        assert reopened.metadata_of("item-5") is None  # replaced without metadata
        assert reopened.metadata_of("item-9") == {"label": "cat", "n": 9}
        assert "item-7" not in reopened
        dogs, _ = reopened.search(unit_rows(1, 2), 10, filter={"label": "dog"})
        assert sorted(dogs[0]) == ["item-3", "new-1"]
        assert reopened.search(unit_rows(1, 2), 10, filter={"tags": "b"})[0] == [["new-1"]]
        with open_index(directory, writable=True) as index:
            index.snapshot()
        again = open_index(directory)
        assert again.metadata_of("item-3") == {"label": "dog", "score": 0.5}
        cats, _ = again.search(unit_rows(1, 2), 50, filter={"label": "cat"})
        assert len(cats[0]) == len([n for n in range(1, 50, 2) if n not in (3, 5, 7)])


def test_an_index_without_metadata_loads_and_answers_filters_with_nothing(tmp_path):
    index = Index.build(unit_rows(30, 0), [f"k{n}" for n in range(30)], **IDENTITY)
    index.save(tmp_path / "plain")
    assert not os.path.exists(os.path.join(snapshot_directory(tmp_path / "plain"),
                                           "metadata.json"))
    loaded = Index.load(tmp_path / "plain")
    assert not loaded.has_metadata and loaded.metadata_of("k1") is None
    assert loaded.search(unit_rows(2, 1), 5, filter={"label": "cat"}) == ([[], []], [[], []])
    keys, _, metadata = loaded.search(unit_rows(1, 1), 3, with_metadata=True)
    assert len(keys[0]) == 3 and metadata == [[None, None, None]]
    assert len(loaded.search(unit_rows(1, 1), 3, filter={})[0][0]) == 3  # {} passes all


def test_recovery_keeps_the_metadata_logged_before_the_damage(tmp_path):
    directory = tmp_path / "index"
    Index.build(unit_rows(20, 0), [f"item-{n}" for n in range(20)], **IDENTITY).save(directory)
    with Index.load(directory, writable=True) as index:
        for n in range(3):
            index.upsert([f"new-{n}"], unit_rows(1, 10 + n), metadata=[{"n": n}])
    log = os.path.join(snapshot_directory(directory), "wal.jsonl")
    with open(log, "rb") as file:
        lines = file.read().split(b"\n")
    damaged = bytearray(lines[1])
    damaged[20] ^= 0x04
    lines[1] = bytes(damaged)
    with open(log, "wb") as file:
        file.write(b"\n".join(lines))
    report = recover(str(directory))
    assert report["recovered"] and report["logs"][0]["kept_records"] == 1
    index = Index.load(directory)
    assert index.metadata_of("new-0") == {"n": 0} and "new-1" not in index
    assert index.search(unit_rows(1, 5), 5, filter={"n": 0})[0] == [["new-0"]]


@pytest.mark.parametrize("layout", ["flat", "sharded"])
def test_delete_removes_an_items_metadata(layout):
    make = Index.build if layout == "flat" else (
        lambda *a, **kw: ShardedIndex.build(*a, num_shards=2, **kw))
    index = make(unit_rows(10, 0), [f"k{n}" for n in range(10)],
                 metadata=[{"label": "cat"}] * 10, **IDENTITY)
    index.delete(["k4"])
    found, _ = index.search(unit_rows(1, 1), 10, filter={"label": "cat"})
    assert "k4" not in found[0] and len(found[0]) == 9
    index.upsert(["k4"], unit_rows(1, 2))  # back, without metadata
    assert index.metadata_of("k4") is None
    assert "k4" not in index.search(unit_rows(1, 1), 10, filter={"label": "cat"})[0][0]


BAD_METADATA = [
    ("a string", "not an object"),
    ({"": 1}, "field name"),
    ({"x": {"nested": 1}}, "holds dict"),
    ({"x": [[1]]}, "holds list"),
    ({"x": float("nan")}, "holds nan"),
    ({"x": float("inf")}, "holds inf"),
    ({"x": "y" * 5000}, "bytes as JSON, more than 4096"),
    ({"x": object()}, "holds object"),
]


@pytest.mark.parametrize("make", [
    lambda: Index.build(unit_rows(4, 0), list("abcd"), **IDENTITY),
    lambda: ShardedIndex.build(unit_rows(4, 0), list("abcd"), num_shards=2, **IDENTITY)])
def test_bad_metadata_and_filters_are_refused_with_one_clear_error(make):
    index = make()
    for metadata, message in BAD_METADATA:
        with pytest.raises(BadMetadataError, match=message):
            index.upsert(["e"], unit_rows(1, 1), metadata=[metadata])
        assert "e" not in index and index.count == 4  # nothing stored
    with pytest.raises(BadMetadataError, match="one .* per item"):
        index.upsert(["e", "f"], unit_rows(2, 1), metadata=[{"a": 1}])
    with pytest.raises(BadMetadataError, match="not one object"):
        index.upsert(["e"], unit_rows(1, 1), metadata={"a": 1})
    for conditions, message in [("cat", "not an object"), ({"a": {"gt": 1}}, "only operator"),
                                ({"a": {"in": 3}}, "only operator"),
                                ({"a": [1, 2]}, "compares with"),
                                ({"a": {"in": [{"b": 1}]}}, "compares with")]:
        with pytest.raises(BadFilterError, match=message):
            index.search(unit_rows(1, 1), 2, filter=conditions)


def test_equality_follows_json_kinds():
    index = Index.build(unit_rows(4, 0), list("abcd"), **IDENTITY, metadata=[
        {"v": 1}, {"v": 1.0}, {"v": True}, {"v": "1"}])
    query = unit_rows(1, 1)
    assert sorted(index.search(query, 4, filter={"v": 1})[0][0]) == ["a", "b"]
    assert index.search(query, 4, filter={"v": True})[0] == [["c"]]
    assert index.search(query, 4, filter={"v": {"in": ["1", None]}})[0] == [["d"]]


# ---------------------------------------------------------------------- the service and CLI

class StubEmbedder:
    """Just what the service needs from an Embedder: each image becomes a fixed vector."""

    embedding_dim = DIM

    def embed_uint8(self, images):
        return unit_rows(len(images), 99)

    def embed(self, images):
        return unit_rows(len(images), 99)


class StubRetriever(Retriever):
    def decode_image(self, data, *, max_pixels):
        return np.zeros((4, 4, 1), np.uint8)


@pytest.fixture()
def client():
    index = Index.build(unit_rows(8, 0), [f"k{n}" for n in range(8)], **IDENTITY,
                        metadata=[{"label": "cat" if n % 2 else "dog"} for n in range(8)])
    retriever = StubRetriever(StubEmbedder(), index)
    with TestClient(create_app(retriever, ServiceSettings(
            allowed_hosts=("testserver",)))) as test_client:
        yield test_client, retriever


def test_the_service_takes_metadata_and_filters(client):
    client, retriever = client
    vector = unit_rows(1, 5)[0].tolist()
    answer = client.post("/search?k=8", json={"embedding": vector, "filter": {"label": "cat"}})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 4 and all(hit["metadata"] == {"label": "cat"} for hit in results)
    added = client.post("/items", json={"items": [
        {"id": "new", "embedding": vector, "metadata": {"label": "bird", "year": 2024}},
        {"id": "bare", "embedding": vector}]})
    assert added.status_code == 200, added.text
    assert retriever.metadata_of("new") == {"label": "bird", "year": 2024}
    hits = client.post("/search?k=3", json={"embedding": vector}).json()["results"]
    assert {"id": "bare", "score": pytest.approx(1.0, abs=1e-5)} in hits  # no metadata key
    upload = {"image": ("q.png", b"png", "image/png")}
    form = client.post("/search?k=8", files=upload, data={"filter": '{"year": {"in": [2024]}}'})
    assert [hit["id"] for hit in form.json()["results"]] == ["new"]
    pairs = client.post("/items", files=[("image", ("a.png", b"a", "image/png")),
                                         ("image", ("b.png", b"b", "image/png"))],
                        data={"id": ["m1", "m2"], "metadata": ['{"label": "fox"}', ""]})
    assert pairs.status_code == 200, pairs.text
    assert retriever.metadata_of("m1") == {"label": "fox"} and retriever.metadata_of("m2") is None
    schema = json.dumps(client.get("/openapi.json").json()["paths"])
    assert "filter" in schema and "metadata" in schema


@pytest.mark.parametrize("request_kwargs, code", [
    ({"json": {"embedding": [1.0] * DIM, "filter": "cat"}}, "bad_filter"),
    ({"json": {"embedding": [1.0] * DIM, "filter": {"a": {"lt": 1}}}}, "bad_filter"),
    ({"files": {"image": ("q.png", b"png", "image/png")}, "data": {"filter": "{oops"}},
     "bad_filter"),
])
def test_the_service_refuses_bad_filters(client, request_kwargs, code):
    client, _ = client
    answer = client.post("/search", **request_kwargs)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == code, answer.text


@pytest.mark.parametrize("request_kwargs", [
    {"json": {"items": [{"id": "x", "embedding": [1.0] * DIM, "metadata": [1]}]}},
    {"json": {"items": [{"id": "x", "embedding": [1.0] * DIM, "metadata": {"a": {"b": 1}}}]}},
    {"json": {"items": [{"id": "x", "embedding": [1.0] * DIM, "metadata": {"a": "b" * 5000}}]}},
    {"files": [("image", ("a.png", b"a", "image/png"))], "data": {"id": "x", "metadata": "{"}},
    {"files": [("image", ("a.png", b"a", "image/png"))],
     "data": {"id": "x", "metadata": ["{}", "{}"]}},
])
def test_the_service_refuses_bad_metadata(client, request_kwargs):
    client, retriever = client
    answer = client.post("/items", **request_kwargs)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "bad_metadata"
    assert "x" not in retriever  # nothing stored


def test_the_cli_searches_with_a_filter(monkeypatch, capsys, tmp_path):
    index = Index.build(unit_rows(6, 0), [f"k{n}" for n in range(6)], **IDENTITY,
                        metadata=[{"label": "cat" if n < 2 else "dog"} for n in range(6)])
    monkeypatch.setattr(Retriever, "load", classmethod(
        lambda cls, workdir, **kwargs: StubRetriever(StubEmbedder(), index)))
    assert cli.main(["search", "q.png", "--workdir", str(tmp_path), "--k", "5",
                     "--filter", '{"label": "cat"}']) == 0
    line = json.loads(capsys.readouterr().out)
    assert sorted(hit["id"] for hit in line["results"]) == ["k0", "k1"]
    assert all(hit["metadata"] == {"label": "cat"} for hit in line["results"])
    assert cli.main(["search", "q.png", "--workdir", str(tmp_path),
                     "--filter", '{"label": {"gt": 1}}']) == 1
    assert "only operator" in capsys.readouterr().err


def test_a_logged_record_with_bad_metadata_is_damage(tmp_path):
    from jaxretrieval.errors import JaxRetrievalError
    from jaxretrieval.index import wal

    directory = tmp_path / "index"
    Index.build(unit_rows(5, 0), [f"k{n}" for n in range(5)], **IDENTITY).save(directory)
    with Index.load(directory, writable=True) as index:
        index.upsert(["good"], unit_rows(1, 1), metadata=[{"n": 1}])
    log = os.path.join(snapshot_directory(directory), "wal.jsonl")
    # Whole lines with valid checksums, but metadata no upsert would have taken.
    bad = {"op": "upsert", "keys": ["bad"], "embeddings": wal.encode_vectors(unit_rows(1, 2)),
           "sources": None, "metadata": [{"n": {"nested": 1}}]}
    with open(log, "ab") as file:
        file.write(wal.encode_record(bad) + wal.encode_record(bad))
    with pytest.raises(JaxRetrievalError, match="line 2.*recover-index"):
        Index.load(directory)
    assert recover(str(directory))["lost_records"] == 2
    index = Index.load(directory)
    assert index.metadata_of("good") == {"n": 1} and "bad" not in index
