"""The service against hostile HTTP: body caps and timeouts, the head's limits, content
types, the Host rule, the API key's form, and status codes that tell the truth. Served by
real uvicorn over a socket, as `jaxretrieval serve` runs it."""

import asyncio
import io
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.retriever import Retriever, UnknownItemError
from jaxretrieval.service.app import ServiceSettings, create_app
from service_helpers import ServerThread, exchange, multipart, request_bytes

SETTINGS = dict(max_upload_bytes=200_000, max_pixels=1_000_000, max_queue=8,
                max_multipart_bytes=300_000, header_timeout_s=1.0, body_timeout_s=2.0,
                decode_threads=1, max_decode_queue=1, max_solo_queue=1)


def png(side=8, value=0):
    out = io.BytesIO()
    Image.new("L", (side, side), value).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def retriever(trained_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("hardening") / "wd")
    shutil.copytree(trained_workdir[0], workdir)
    retriever = Retriever.load(workdir, writable=True)
    yield retriever
    retriever.close()


@pytest.fixture(scope="module")
def server(retriever):
    served = ServerThread(retriever, ServiceSettings(**SETTINGS))
    yield served
    served.stop()


def call(server, method, path, body=b"", **kwargs):
    response, _ = exchange(server.port, request_bytes(method, path, body, **kwargs))
    return response


def assert_error(response, status, code=None):
    assert response is not None, "no response"
    assert response.status == status, response
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body


# ---------------------------------------------------------------------- blocking work

def crowd_a_held_pool(server, retriever, monkeypatch, held, path, fields):
    """Holds `retriever.<held>` on its first call and sends three requests to `path`: one
    runs, one may wait (a pool of one thread with one place in its line), one is refused at
    once. The event loop must answer meanwhile. Returns the answers and the names of the
    threads the held work ran in."""
    release, started = threading.Event(), threading.Event()
    threads = []
    work = getattr(retriever, held)

    def held_work(*args, **kwargs):
        threads.append(threading.current_thread().name)
        started.set()
        release.wait(20)
        return work(*args, **kwargs)

    monkeypatch.setattr(retriever, held, held_work)
    body, content_type = multipart(fields)
    answers = []

    def send():
        answers.append(call(server, "POST", path, body, content_type=content_type))

    senders = [threading.Thread(target=send) for _ in range(3)]
    senders[0].start()
    try:
        assert started.wait(20)
        for thread in senders[1:]:
            thread.start()
        deadline = time.monotonic() + 20
        while not any(a.status == 503 for a in answers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call(server, "GET", "/healthz").status == 200
    finally:
        release.set()
        for thread in senders:
            thread.join()
    assert sorted(a.status for a in answers) == [200, 200, 503], answers
    assert_error(next(a for a in answers if a.status == 503), 503, "overloaded")
    return answers, threads


def test_uploads_decode_in_a_bounded_pool_and_the_loop_keeps_answering(server, retriever,
                                                                       monkeypatch):
    # decode_threads=1, max_decode_queue=1
    _, threads = crowd_a_held_pool(server, retriever, monkeypatch, "decode_image",
                                   "/search?k=1", [("image", "q.png", png())])
    assert set(threads) and all(name.startswith("image-decode") for name in threads)


def test_explanations_run_one_at_a_time_and_a_full_line_is_refused(server, retriever,
                                                                   monkeypatch):
    # max_solo_queue=1
    _, threads = crowd_a_held_pool(server, retriever, monkeypatch, "explain_uint8",
                                   "/explain", [("image_a", "a.png", png(value=40)),
                                                ("image_b", "b.png", png(value=200))])
    assert len(threads) == 2 and all(name.startswith("solo-model") for name in threads)


# ---------------------------------------------------------------------- body caps

def test_a_json_body_over_its_cap_is_refused(server):
    body = json.dumps({"embedding": [0.5] * 400_000}).encode()  # 2 MB, over the 1 MiB cap
    assert_error(call(server, "POST", "/search", body, content_type="application/json"),
                 413, "too_large")


def test_a_client_expecting_100_continue_hears_413_at_once(server):
    raw = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 413 ") and b'"too_large"' in data


def test_a_chunked_body_is_counted_as_it_arrives(server):
    """No Content-Length: the cap holds on the bytes themselves, and the refusal reaches a
    client that sent its whole (over-cap) body."""
    parts = [("image", f"q{i}.png", b"\x89PNG" + bytes(100_000)) for i in range(9)]
    body, content_type = multipart(parts)  # 900 kB, three times the multipart cap
    chunks = b"".join(b"%x\r\n" % len(body[i:i + 65536]) + body[i:i + 65536] + b"\r\n"
                      for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    head = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    response, closed = exchange(server.port, head + chunks)
    assert_error(response, 413, "too_large")
    assert closed


def test_the_guard_stops_reading_an_endless_body():
    """At most cap + DRAIN_BYTES (+ a chunk) of a body that never ends are read."""
    from jaxretrieval.service.guards import DRAIN_BYTES, RequestGuard

    consumed, sent = [0], []

    async def endless():
        consumed[0] += 65536
        await asyncio.sleep(0)
        return {"type": "http.request", "body": bytes(65536), "more_body": True}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        while True:
            await receive()

    guard = RequestGuard(app, hosts=None, max_json_bytes=100_000, max_multipart_bytes=100_000,
                         body_timeout_s=30)
    scope = {"type": "http", "method": "POST", "path": "/search",
             "headers": [(b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")]}
    asyncio.run(guard(scope, endless, send))
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "too_large"
    assert consumed[0] <= 100_000 + DRAIN_BYTES + 2 * 65536


# ---------------------------------------------------------------------- timeouts

def test_a_stalled_head_is_answered_408_and_closed(server):
    response, closed = exchange(server.port, b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert_error(response, 408, "timeout")
    assert closed
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert sock.recv(65536) == b""  # a silent connection is closed too, not held open


def test_a_stalled_body_is_answered_408_and_closed(server):
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"embedding\": ")
    response, closed = exchange(server.port, head)
    assert_error(response, 408, "timeout")
    assert closed


# ---------------------------------------------------------------------- 500s that are 4xx

def test_deeply_nested_json_is_a_400(server):
    for body in (b"[" * 100_000, b'{"embedding": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        assert_error(call(server, "POST", "/search", body, content_type="application/json"),
                     400, "bad_json")
    assert call(server, "GET", "/healthz").status == 200


@pytest.mark.parametrize("raw,status,code", [
    (b"GARBAGE\r\n\r\n", 400, "bad_http"),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n", 400, "bad_http"),
    (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Filler: " + b"a" * 100_000 + b"\r\n\r\n",
     431, "head_too_large"),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: " + b"a" * 100_000, 431,
     "head_too_large"),
])
def test_malformed_http_is_answered_in_the_error_shape(server, raw, status, code):
    response, closed = exchange(server.port, raw)
    assert_error(response, status, code)
    assert response.headers["content-type"] == "application/json" and closed


# ---------------------------------------------------------------------- status codes

def test_more_images_than_the_queue_holds_is_413_not_503(server):
    body, content_type = multipart([field for i in range(9) for field in (
        ("id", None, f"many/{i}".encode()), ("image", f"{i}.png", png()))])
    response = call(server, "POST", "/items", body, content_type=content_type)
    assert_error(response, 413, "too_many_images")
    assert "8" in response.json()["error"]["message"]


def test_concurrent_deletes_of_one_id_are_404_for_all_but_one(retriever):
    dim = retriever.embedding_dim
    rounds, workers = 40, 6
    outcomes = []
    for round_ in range(rounds):
        key = f"race/{round_}"
        retriever.upsert_embeddings([key], np.eye(1, dim, dtype=np.float32))
        barrier = threading.Barrier(workers)

        def delete():
            barrier.wait()
            try:
                retriever.delete([key])
                outcomes.append("deleted")
            except UnknownItemError:
                outcomes.append("unknown")
            except JaxRetrievalError as err:
                outcomes.append(f"other: {err}")

        threads = [threading.Thread(target=delete) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert outcomes.count("deleted") == rounds
    assert [o for o in outcomes if o.startswith("other")] == []


def test_concurrent_http_deletes_of_one_id_are_404(server, retriever):
    dim = retriever.embedding_dim
    statuses = []
    for round_ in range(10):
        key = f"race-http/{round_}"
        retriever.upsert_embeddings([key], np.eye(1, dim, dtype=np.float32))
        threads = [threading.Thread(target=lambda: statuses.append(
            call(server, "DELETE", f"/items/{key}").status)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(set(statuses)) == [200, 404] and statuses.count(200) == 10


# ---------------------------------------------------------------------- browser-borne writes

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None, "multipart/form-data",
                                          "application/json; charset=latin-1"])
def test_bodies_other_than_json_and_multipart_are_415(server, retriever, content_type):
    vector = np.eye(1, retriever.embedding_dim)[0].tolist()
    body = json.dumps({"items": [{"id": "browser/1", "embedding": vector}]}).encode()
    response = call(server, "POST", "/items", body, content_type=content_type)
    assert_error(response, 415, "unsupported_media_type")
    assert "browser/1" not in retriever
    assert call(server, "POST", "/search", body, content_type=content_type).status == 415


def test_json_with_a_utf8_charset_is_accepted(server, retriever):
    vector = np.eye(1, retriever.embedding_dim)[0].tolist()
    body = json.dumps({"embedding": vector}).encode()
    response = call(server, "POST", "/search?k=1", body,
                    content_type="application/json; charset=UTF-8")
    assert response.status == 200, response


@pytest.mark.parametrize("path", ["/healthz", "/", "/docs", "/openapi.json", "/metrics",
                                  "/items/train/1/thumbnail", "/nowhere"])
def test_a_foreign_host_is_refused_on_every_route(server, path):
    assert_error(call(server, "GET", path, host="attacker.example"), 421, "bad_host")
    assert_error(call(server, "GET", path, host="attacker.example:8000"), 421, "bad_host")
    response = call(server, "GET", "/healthz", host=f"127.0.0.1:{server.port}")
    assert response.status == 200


def test_a_foreign_host_cannot_write(server, retriever):
    vector = np.eye(1, retriever.embedding_dim)[0].tolist()
    body = json.dumps({"items": [{"id": "rebound/1", "embedding": vector}]}).encode()
    assert_error(call(server, "POST", "/items", body, content_type="application/json",
                      host="rebind.attacker.example"), 421, "bad_host")
    assert "rebound/1" not in retriever


def test_the_host_rule():
    from jaxretrieval.service.guards import allowed_host_names, host_name

    loopback = allowed_host_names("127.0.0.1", ())
    assert loopback == {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_host_names("::1", ()) == loopback
    assert allowed_host_names("10.1.2.3", ("search.lan",)) == {"10.1.2.3", "search.lan"}
    assert allowed_host_names("0.0.0.0", ("Search.LAN",)) == loopback | {"search.lan"}
    assert allowed_host_names("127.0.0.1", ("::1", "*")) is None
    assert allowed_host_names("fe80::1", ()) == {"[fe80::1]"}
    assert [host_name(v) for v in ("LocalHost:8000", "[::1]:80", "127.0.0.1", "a:b", "",
                                   "[::1]x")] == ["localhost", "[::1]", "127.0.0.1", None,
                                                  None, None]


# ---------------------------------------------------------------------- the API key

@pytest.mark.parametrize("key", ["clé", "tab\tkey", " padded", ""])
def test_a_key_no_header_can_carry_is_refused_at_start(retriever, key):
    with pytest.raises(JaxRetrievalError, match="printable ASCII"):
        create_app(retriever, ServiceSettings(api_key=key))


def test_the_command_line_refuses_such_a_key_before_loading(tmp_path, monkeypatch):
    from jaxretrieval.cli import run_serve

    with pytest.raises(JaxRetrievalError, match="printable ASCII"):
        run_serve(["--workdir", str(tmp_path / "nothing"), "--api-key", "schlüssel"])
    monkeypatch.setenv("JAXRETRIEVAL_API_KEY", "schlüssel")
    with pytest.raises(JaxRetrievalError, match="printable ASCII"):
        run_serve(["--workdir", str(tmp_path / "nothing")])


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"},
                                     {"Origin": "null"},
                                     {"Origin": "http://evil.example:8000"},
                                     {"Sec-Fetch-Site": "cross-site"}])
def test_a_page_of_another_site_cannot_write_even_by_multipart(server, retriever, headers):
    """A multipart form is sent cross-site with no preflight and with this server's Host."""
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    body, content_type = multipart([("id", None, b"csrf/1"), ("image", "a.png", png.getvalue())])
    response = call(server, "POST", "/items", body, content_type=content_type,
                    host=f"127.0.0.1:{server.port}", headers=headers)
    assert_error(response, 403, "cross_origin")
    assert "csrf/1" not in retriever
    assert_error(call(server, "DELETE", "/items/train/1", host=f"127.0.0.1:{server.port}",
                      headers=headers), 403, "cross_origin")
    assert "train/1" in retriever


def test_the_service_page_and_programs_still_write(server, retriever):
    vector = np.eye(1, retriever.embedding_dim)[0].tolist()
    for i, headers in enumerate([{"Origin": f"http://127.0.0.1:{server.port}",
                                  "Sec-Fetch-Site": "same-origin"}, {}]):
        body = json.dumps({"items": [{"id": f"own/{i}", "embedding": vector}]}).encode()
        response = call(server, "POST", "/items", body, content_type="application/json",
                        host=f"127.0.0.1:{server.port}", headers=headers)
        assert response.status == 200, response
        assert f"own/{i}" in retriever


@pytest.mark.parametrize("bad", [dict(decode_threads=-1), dict(body_timeout_s=0),
                                 dict(header_timeout_s=float("nan")), dict(max_json_bytes=0),
                                 dict(max_k=True), dict(max_queue="8")])
def test_settings_out_of_range_are_one_clear_error(bad):
    name = next(iter(bad))
    with pytest.raises(JaxRetrievalError, match=name):
        ServiceSettings(**bad)
