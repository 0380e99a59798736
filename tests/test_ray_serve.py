"""`serve --ray`: the same app over Ray Serve deployments, on a local cluster of a head and
two worker nodes, with the index in 2 shards of 2 read replicas each.

The Ray tests are skipped when Ray is not installed (`pip install -e ".[ray]"`), unless
JAXRETRIEVAL_REQUIRE_RAY=1. The log follower and the CLI's refusal run without Ray.
"""

import importlib.util
import io
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from jaxretrieval.cli import main
from jaxretrieval.index import Index, ShardedIndex, shard_of
from jaxretrieval.index.follower import LogFollower, caught_up, writer_position

DIM = 8
IDENTITY = {"checkpoint_step": 1, "model_config_hash": "abc"}
API_KEY = "ray-test-key"
NUM_SHARDS = 2
REPLICAS = 2


def unit_rows(count, seed, dim=DIM):
    rows = np.random.default_rng(seed).normal(size=(count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------- without Ray

def test_a_follower_applies_what_the_writer_logs_and_follows_its_snapshots(tmp_path):
    directory = str(tmp_path / "index")
    Index.build(unit_rows(20, 0), [f"k{i}" for i in range(20)], **IDENTITY).save(directory)
    writer = Index.load(directory, writable=True)
    follower = LogFollower(directory)
    assert follower.index.count == 20 and caught_up(follower.position,
                                                    writer_position(directory))
    extra = unit_rows(3, 1)
    writer.upsert(["new0", "new1", "new2"], extra)
    writer.delete(["k0"])
    wanted = writer_position(directory)
    assert not caught_up(follower.position, wanted)
    follower.follow_to(wanted)
    assert "new1" in follower.index and "k0" not in follower.index
    assert follower.index.search(extra[1], 1)[0] == [["new1"]]
    # A line the writer has not finished is left for later, not half applied.
    with open(_log(directory), "ab") as log:
        log.write(b"0000")
    assert follower.follow() == wanted
    with open(_log(directory), "r+b") as log:
        log.truncate(wanted[1])
    writer.snapshot()  # a new snapshot with an empty log: the follower starts from it
    writer.upsert(["after"], unit_rows(1, 2))
    follower.follow()
    assert follower.position == writer_position(directory)
    assert sorted(follower.index.keys) == sorted(writer.keys)
    writer.close()


def _log(directory):
    version, _ = writer_position(directory)
    return os.path.join(directory, "snapshots", version, "wal.jsonl")


def test_serve_ray_without_ray_installed_says_what_to_install(monkeypatch, capsys, tmp_path):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["serve", "--workdir", str(tmp_path), "--ray", "--port", "0"]) == 1
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err


def test_ray_flags_need_ray(capsys, tmp_path):
    assert main(["serve", "--workdir", str(tmp_path), "--replicas", "2"]) == 1
    assert "--ray" in capsys.readouterr().err


# ---------------------------------------------------------------------- on a Ray cluster

def _ray_available():
    if importlib.util.find_spec("ray") is not None:
        return True
    if os.environ.get("JAXRETRIEVAL_REQUIRE_RAY") == "1":
        pytest.fail("JAXRETRIEVAL_REQUIRE_RAY=1 but ray is not installed: "
                    "pip install -e '.[ray]'")
    return False


@pytest.fixture(scope="module")
def cluster(trained_workdir, tmp_path_factory):
    """(TestClient of the app over Ray, the RayRetriever, workdir, the one-process sharded
    index read before the deployments started)."""
    if not _ray_available():
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    import ray
    from fastapi.testclient import TestClient
    from ray.cluster_utils import Cluster

    from jaxretrieval.pipeline import rebuild_index
    from jaxretrieval.service.app import ServiceSettings, create_app
    from jaxretrieval.rayserve.backend import start_ray_backend

    workdir = str(tmp_path_factory.mktemp("ray") / "wd")
    shutil.copytree(trained_workdir[0], workdir)
    rebuild_index(workdir, num_shards=NUM_SHARDS)
    reference = ShardedIndex.load(os.path.join(workdir, "index"))
    # The nodes' workers import this checkout, as the test process does.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(2):
            nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    backend = None
    try:
        # Replicas poll the log rarely here, so that a search right after an update
        # finds it only if the replica reads up to the position the search names.
        backend = start_ray_backend(workdir, replicas=REPLICAS, embedder_replicas=1,
                                    replica_cpus=0.25, embedder_cpus=0.5, max_batch=8,
                                    poll_s=1.0)
        settings = ServiceSettings(api_key=API_KEY, max_k=50, max_batch=8,
                                   allowed_hosts=("testserver",))
        with TestClient(create_app(backend, settings)) as client:
            yield client, backend, workdir, reference
    finally:
        if backend is not None:
            backend.close()
        from ray import serve
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


def _shard_handle(number):
    from ray import serve
    return serve.get_deployment_handle(f"shard-{number}", "jaxretrieval")


def _replicas(number):
    """describe() of every running replica of shard `number`."""
    return _shard_handle(number).broadcast("describe").results(timeout_s=60)


def _on_every_replica(key, present=True, timeout=30):
    """Waits until every replica of the shard owning `key` (as many as REPLICAS) shows it
    (or, with present=False, does not); returns how many replicas it asked."""
    number = shard_of(key, NUM_SHARDS)
    deadline = time.monotonic() + timeout
    while True:
        answers = _shard_handle(number).broadcast("contains", [key], None).results(
            timeout_s=60)
        if len(answers) == REPLICAS and all(found == [present] for found in answers):
            return len(answers)
        assert time.monotonic() < deadline, f"{key!r}: replicas answer {answers}"
        time.sleep(0.1)


def _search(client, vector, k=5):
    return client.post(f"/search?k={k}", json={"embedding": [float(x) for x in vector]})


def test_results_equal_the_one_process_sharded_index(cluster, trained_workdir):
    client, backend, workdir, reference = cluster
    assert client.get("/healthz").json()["items"] == reference.count
    assert {len(_replicas(number)) for number in range(NUM_SHARDS)} == {REPLICAS}
    dim = reference.embedding_dim
    queries = unit_rows(12, 5, dim)
    for query in queries:
        response = _search(client, query, k=7)
        assert response.status_code == 200, response.text
        keys, scores = reference.search(query[None], 7)
        got = response.json()["results"]
        assert [hit["id"] for hit in got] == keys[0]
        assert [hit["score"] for hit in got] == scores[0]
    # By image: the embedder deployment gives the in-process model's embedding.
    from jaxretrieval.retriever import Retriever
    local = Retriever.load(workdir)
    image = (np.random.default_rng(3).integers(0, 255, (16, 16))).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    response = client.post("/search?k=5", files={"image": ("q.png", png.getvalue())})
    assert response.status_code == 200, response.text
    keys, scores = local.search([image], 5)
    assert [hit["id"] for hit in response.json()["results"]] == keys[0]
    np.testing.assert_allclose([hit["score"] for hit in response.json()["results"]],
                               scores[0], rtol=1e-4, atol=1e-5)
    # Errors are the one-process service's.
    assert client.post("/search?k=0", json={"embedding": [0.0] * dim}).json()["error"][
        "code"] == "bad_k"
    assert client.delete("/items/nope", headers={"X-API-Key": API_KEY}).status_code == 404
    # /explain needs the model's gradients, which the front end does not hold: one clear 501.
    response = client.post("/explain", files={"image_a": ("a.png", png.getvalue()),
                                              "image_b": ("b.png", png.getvalue())})
    assert response.status_code == 501 and "without --ray" in response.json()["error"]["message"]


def test_acknowledged_updates_are_visible_on_every_replica(cluster):
    client, backend, _, reference = cluster
    dim = reference.embedding_dim
    vectors = unit_rows(6, 11, dim)
    keys = [f"added-{i}" for i in range(len(vectors))]
    assert {shard_of(key, NUM_SHARDS) for key in keys} == set(range(NUM_SHARDS))
    response = client.post("/items", headers={"X-API-Key": API_KEY}, json={"items": [
        {"id": key, "embedding": vector.tolist()} for key, vector in zip(keys, vectors)]})
    assert response.status_code == 200, response.text
    assert response.json()["items"] == reference.count + len(keys)
    # Through the ingress at once (the search names the acknowledged log position) ...
    for key, vector in zip(keys, vectors):
        assert _search(client, vector, k=1).json()["results"][0]["id"] == key
    # ... and on every replica of the owning shard, by its own following of the log.
    for key in keys:
        assert _on_every_replica(key) == REPLICAS
    assert client.delete(f"/items/{keys[0]}", headers={"X-API-Key": API_KEY}).json()[
        "items"] == reference.count + len(keys) - 1
    assert _search(client, vectors[0], k=1).json()["results"][0]["id"] != keys[0]
    _on_every_replica(keys[0], present=False)


def test_metadata_and_filters_reach_every_shard(cluster):
    client, _, _, reference = cluster
    dim = reference.embedding_dim
    vectors = unit_rows(5, 21, dim)
    keys = [f"tagged-{i}" for i in range(len(vectors))]
    assert {shard_of(key, NUM_SHARDS) for key in keys} == set(range(NUM_SHARDS))
    response = client.post("/items", headers={"X-API-Key": API_KEY}, json={"items": [
        {"id": key, "embedding": vector.tolist(), "metadata": {"tag": "ray", "n": i}}
        for i, (key, vector) in enumerate(zip(keys, vectors))]})
    assert response.status_code == 200, response.text
    query = vectors[0]
    response = client.post("/search?k=10", json={"embedding": query.tolist(),
                                                 "filter": {"tag": "ray", "n": {"in": [0, 2, 4]}}})
    assert response.status_code == 200, response.text
    got = response.json()["results"]
    # Exactly the passing items, best first, each with its metadata, from both shards.
    scores = vectors @ query
    expected = sorted((0, 2, 4), key=lambda i: -scores[i])
    assert [hit["id"] for hit in got] == [keys[i] for i in expected]
    assert [hit["metadata"] for hit in got] == [{"tag": "ray", "n": i} for i in expected]
    bad = client.post("/search", json={"embedding": query.tolist(), "filter": {"n": {"gt": 1}}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_filter"
    for key in keys:
        assert client.delete(f"/items/{key}", headers={"X-API-Key": API_KEY}).status_code == 200


def test_killing_a_replica_and_a_writer_under_load_loses_no_acknowledged_update(cluster):
    client, backend, _, reference = cluster
    dim = reference.embedding_dim
    stop = threading.Event()
    outcomes, acknowledged, problems = [], {}, []
    lock = threading.Lock()

    def query(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            response = _search(client, unit_rows(1, int(rng.integers(1 << 30)), dim)[0])
            with lock:
                outcomes.append(response.status_code)
                if response.status_code != 200:
                    problems.append(response.json())

    def write():
        number = 0
        while not stop.is_set():
            key, vector = f"load-{number}", unit_rows(1, 1000 + number, dim)[0]
            response = client.post("/items", headers={"X-API-Key": API_KEY}, json={
                "items": [{"id": key, "embedding": vector.tolist()}]})
            with lock:
                outcomes.append(response.status_code)
                if response.status_code == 200:
                    acknowledged[key] = vector
                else:
                    problems.append(response.json())
            number += 1

    threads = [threading.Thread(target=query, args=(seed,)) for seed in range(2)]
    threads.append(threading.Thread(target=write))
    for thread in threads:
        thread.start()
    import ray

    time.sleep(1.5)
    victim = _replicas(0)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(2)
    writer = ray.get_actor("jaxretrieval-writer-0")
    writer_pid = ray.get(writer.pid.remote(), timeout=60)
    os.kill(writer_pid, signal.SIGKILL)  # Ray starts another, which reopens the shard
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    failed = sum(status != 200 for status in outcomes)
    print(f"\nkilled replica {victim['replica']} (pid {victim['pid']}) and the writer "
          f"(pid {writer_pid}) of shard 0 under load: {len(outcomes)} requests, {failed} "
          f"failed, {len(acknowledged)} acknowledged updates")
    deadline = time.monotonic() + 120
    while True:  # Ray has started another writer, which answers
        try:
            assert ray.get(writer.pid.remote(), timeout=60) != writer_pid
            break
        except ray.exceptions.RayActorError:  # still restarting
            assert time.monotonic() < deadline, "Ray did not restart the writer"
            time.sleep(0.5)
    for problem in problems:  # a failure is a 503 that tells the client to retry
        assert problem["error"]["code"] == "unavailable", problem
        assert "retry" in problem["error"]["message"], problem
    assert failed <= max(5, len(outcomes) // 10), problems
    assert len(acknowledged) >= 3 and len(outcomes) >= 20
    # Every acknowledged update is found, through the ingress and on every replica,
    # the one Serve started in place of the killed one included.
    for key, vector in acknowledged.items():
        assert _search(client, vector, k=1).json()["results"][0]["id"] == key
    deadline = time.monotonic() + 120
    while victim["pid"] in {r["pid"] for r in _replicas(0)} or len(_replicas(0)) < REPLICAS:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.5)
    for key in acknowledged:
        _on_every_replica(key)
