"""Seeded fuzzing of the real server over a socket: 1,200 malformed requests across every
endpoint. None may answer 5xx, every refusal must have the error shape, and afterwards the
server still serves and a fixed query's results are unchanged.

Reproduce a failure from its request number: `Fuzzer(SEED).request(number)` rebuilds the
same bytes.
"""

import io
import json
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxretrieval.retriever import Retriever
from jaxretrieval.service.app import ServiceSettings
from service_helpers import ServerThread, exchange

SEED = 17
REQUESTS = 1200
API_KEY = "fuzz-key"
SETTINGS = ServiceSettings(api_key=API_KEY, max_k=50, max_upload_bytes=200_000,
                           max_pixels=1_000_000, max_queue=16, header_timeout_s=2.0,
                           body_timeout_s=5.0)
ENDPOINTS = [("GET", "/"), ("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/search"),
             ("POST", "/match"), ("POST", "/explain"), ("POST", "/items"),
             ("DELETE", "/items/{id}"),
             ("GET", "/items/{id}/thumbnail"), ("GET", "/docs"), ("GET", "/openapi.json")]
METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO", "get"]
# Never existing items: the fuzzer may add and delete these with the key.
FUZZ_IDS = ["fuzz/1", "fuzz/2", "x", "é/ü", "a" * 300, "%00", "..", "../../etc/passwd",
            "fuzz/%2e%2e", "id with spaces", "fuzz/1/thumbnail", "0"]
# Existing items: reached only without the key, or by reading.
LIVE_IDS = ["train/3", "train/5", "train/1796"]
NUMBERS = ["5", "1", "0", "-1", "50", "51", "NaN", "inf", "-inf", "1e309", "9" * 40, "abc",
           "", "0x10", "1.5", "%00", "🙂", "1e-400", "nan", "true"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8",
                 "application/json; charset=utf-16", "text/plain", "multipart/form-data",
                 "application/x-www-form-urlencoded", "image/png", "", "garbage/;;;",
                 "multipart/form-data; boundary=", "APPLICATION/JSON"]


def png_bytes(side, mode="L"):
    out = io.BytesIO()
    Image.new(mode, (side, side), 128).save(out, format="PNG")
    return out.getvalue()


class Fuzzer:
    """Builds request number `i` from (SEED, i) alone, so that any one can be rebuilt."""

    def __init__(self, seed, port=0, dim=16):
        self.seed, self.port, self.dim = seed, port, dim
        self.images = [png_bytes(8), png_bytes(8, "RGB"), png_bytes(1), png_bytes(40, "RGBA")]
        big = png_bytes(2000)  # 4M pixels, over max_pixels
        self.images += [big, self.images[0][: len(self.images[0]) // 2], b"", b"\x89PNG\r\n"]

    def request(self, i) -> tuple[bytes, bool]:
        """(raw request bytes, whether the request is complete HTTP)."""
        rng = random.Random(self.seed * 1_000_003 + i)
        if rng.random() < 0.08:
            return self.raw_garbage(rng)
        method, path = rng.choice(ENDPOINTS)
        if rng.random() < 0.25:
            method = rng.choice(METHODS)
        keyed = rng.random() < 0.5
        if "{id}" in path:
            # With the key, DELETE only never-existing ids: the gallery must end as it began.
            pool = FUZZ_IDS if keyed and method != "GET" else FUZZ_IDS + LIVE_IDS
            path = path.replace("{id}", rng.choice(pool))
        path += self.query(rng)
        body, content_type = self.body(rng, path)
        headers = {}
        if rng.random() < 0.9:
            headers["Host"] = rng.choice([f"127.0.0.1:{self.port}", "localhost", "[::1]:1"]
                                         if rng.random() < 0.85 else
                                         ["evil.example", "", "127.0.0.1:x", "[::1", "a:b:c"])
        if content_type is not None:
            headers["Content-Type"] = content_type
        if keyed:
            headers["X-API-Key"] = API_KEY if rng.random() < 0.8 else rng.choice(
                ["wrong", "", "fuzz-key ", "FUZZ-KEY"])
        if rng.random() < 0.05:
            headers[rng.choice(["X-" + "a" * 50, "Accept", "Cookie"])] = "v" * rng.choice(
                [1, 100, 10_000])
        chunked = body and rng.random() < 0.15
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
            cut = max(1, len(body) // rng.randint(1, 4))
            pieces = [body[j:j + cut] for j in range(0, len(body), cut)]
            body = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
        elif body or method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        headers["Connection"] = "close"
        target = path if rng.random() < 0.97 else "/" + "q" * rng.choice([5000, 20_000])
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        return head.encode("utf-8") + body, True

    def query(self, rng) -> str:
        parts = []
        for name in ("k", "threshold"):
            if rng.random() < 0.4:
                parts.append(f"{name}={rng.choice(NUMBERS)}")
        if rng.random() < 0.05:
            parts.append(rng.choice(["&&&", "k", "=", "k=1&k=2", "%zz", "x=" + "y" * 3000]))
        return "?" + "&".join(parts) if parts else ""

    def body(self, rng, path) -> tuple[bytes, str | None]:
        kind = rng.random()
        if kind < 0.15:
            return b"", rng.choice([None, "application/json"])
        if kind < 0.55:
            return self.json_body(rng), rng.choice(CONTENT_TYPES[:3] + ["application/json"] * 4
                                                    + CONTENT_TYPES[3:])
        if kind < 0.9:
            body, boundary = self.multipart_body(rng)
            return body, rng.choice([f"multipart/form-data; boundary={boundary}"] * 6
                                    + ["multipart/form-data; boundary=other",
                                       "multipart/form-data", "application/json"])
        if kind < 0.98:
            return rng.randbytes(rng.choice([1, 10, 1000, 50_000])), rng.choice(CONTENT_TYPES)
        return b"[" * rng.choice([2_000_000, 1_100_000]), "application/json"  # over the cap

    def vector(self, rng):
        dim = self.dim if rng.random() < 0.7 else rng.choice([0, 1, self.dim + 1, 5000])
        values = [rng.gauss(0, 1) for _ in range(dim)]
        if rng.random() < 0.1 and values:
            values[0] = rng.choice(["x", None, [1], {"a": 1}, True, 1e308, -1e308])
        if rng.random() < 0.05:
            values = [0.0] * dim
        return values

    def json_body(self, rng) -> bytes:
        choice = rng.random()
        if choice < 0.3:
            document = {"embedding": self.vector(rng)}
        elif choice < 0.6:
            document = {"items": [{"id": rng.choice(FUZZ_IDS + [5, None, "", ["x"]]),
                                   "embedding": self.vector(rng)}
                                  for _ in range(rng.choice([0, 1, 2, 40]))]}
            if rng.random() < 0.1:
                document = {"items": rng.choice([3, "x", None, {}, [1, 2]])}
        elif choice < 0.7:
            depth = rng.choice([10, 900, 5000, 100_000])
            return (b'{"embedding": ' + b"[" * depth + b"1" + b"]" * depth + b"}")
        elif choice < 0.8:
            document = rng.choice([[], "text", 3, None, {"embedding": "NaN"},
                                   {"embedding": None}, {"vector": [1]}])
        else:
            document = {"embedding": self.vector(rng)}
            text = json.dumps(document).encode()
            return text[: rng.randint(0, len(text))]  # truncated
        text = json.dumps(document)
        if rng.random() < 0.1:
            text = text.replace("0.", "NaN0.", 1).replace("1", "Infinity", 1)
        return text.encode()

    def multipart_body(self, rng) -> tuple[bytes, str]:
        boundary = "fuzzboundary%d" % rng.randint(0, 9)
        fields = []
        for _ in range(rng.choice([0, 1, 2, 3, 20])):
            name = rng.choice(["image", "image_a", "image_b", "id", "other", "", "im\"age"])
            if name == "id":
                fields.append((name, None, rng.choice(FUZZ_IDS).encode()))
            else:
                data = rng.choice(self.images) if rng.random() < 0.7 else rng.randbytes(
                    rng.choice([0, 5, 500, 300_000]))
                fields.append((name, rng.choice(["q.png", None, "", "a\"b.png"]), data))
        parts = []
        for name, filename, data in fields:
            disposition = f'form-data; name="{name}"' + (
                f'; filename="{filename}"' if filename is not None else "")
            parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                         + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        if rng.random() < 0.15:
            body = body[: rng.randint(0, len(body))]  # truncated
        return body, boundary

    def raw_garbage(self, rng) -> tuple[bytes, bool]:
        choice = rng.random()
        if choice < 0.3:
            return rng.randbytes(rng.choice([1, 20, 300, 5000])), False
        if choice < 0.5:
            line = rng.choice(["GET", "POST", "\x00", "G\tET"]) + " " + rng.choice(
                ["/", "/healthz", "*", "http://x/", "/\x01", ""]) + " " + rng.choice(
                ["HTTP/1.1", "HTTP/9.9", "HTTP/1", "", "FOO/1.1"])
            return (line + "\r\nHost: 127.0.0.1\r\n\r\n").encode("latin-1"), True
        if choice < 0.7:
            return (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    + rng.choice([b"NoColon\r\n", b": empty\r\n", b"X: \x00\r\n",
                                  b"Content-Length: -1\r\n", b"Content-Length: x\r\n",
                                  b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
                                  b"X: " + b"y" * 70_000 + b"\r\n"]) + b"\r\n"), True
        if choice < 0.85:
            return (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                    b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + rng.choice([b"zz\r\nab\r\n0\r\n\r\n", b"5\r\nab\r\n0\r\n\r\n",
                                  b"-1\r\n\r\n"])), True
        return b"\r\n" * rng.randint(1, 5) + b"GET / HTTP/1.0\r\n\r\n", True


@pytest.fixture(scope="module")
def fuzz_server(trained_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fuzz") / "wd")
    shutil.copytree(trained_workdir[0], workdir)
    retriever = Retriever.load(workdir, writable=True)
    served = ServerThread(retriever, SETTINGS)
    yield served, retriever
    served.stop()
    retriever.close()


def search(port, vector):
    body = json.dumps({"embedding": vector}).encode()
    raw = (f"POST /search?k=10 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    response, _ = exchange(port, raw + body)
    assert response.status == 200, response
    return [(r["id"], r["score"]) for r in response.json()["results"]]


def problem_with(raw: bytes, response, complete: bool) -> str | None:
    """What is wrong with the answer to `raw`, or None."""
    if response is None:
        # A client that sends an incomplete request and stops may be dropped silently.
        return None if not complete else "no response"
    if response.status >= 500:
        return f"status {response.status}"
    if response.status >= 400 and not raw.startswith(b"HEAD "):
        try:
            body = json.loads(response.body)
        except ValueError:
            return f"non-JSON error body {response.body[:200]!r}"
        if not (isinstance(body, dict) and set(body) == {"error"}
                and isinstance(body["error"], dict) and set(body["error"]) == {"code", "message"}
                and all(isinstance(v, str) and v for v in body["error"].values())):
            return f"error body not in the shape: {body!r:.300}"
    return None


def test_a_thousand_malformed_requests_leave_the_service_correct(fuzz_server):
    server, retriever = fuzz_server
    count_before = retriever.count
    query = retriever.embed([np.zeros((16, 16, 1), np.uint8) + 40])[0].tolist()
    before = search(server.port, query)

    fuzzer = Fuzzer(SEED, server.port, retriever.embedding_dim)
    problems, statuses = [], {}
    for i in range(REQUESTS):
        raw, complete = fuzzer.request(i)
        response, _ = exchange(server.port, raw, shut_write=not complete,
                               head_only=raw.startswith(b"HEAD "))
        statuses[response.status if response else None] = statuses.get(
            response.status if response else None, 0) + 1
        problem = problem_with(raw, response, complete)
        if problem:
            problems.append(f"request {i}: {problem}; sent {raw[:160]!r}")
    assert not problems, f"{len(problems)} bad answers:\n" + "\n".join(problems[:15])
    # The run reached the endpoints' own checks, not only the guards.
    assert sum(n for s, n in statuses.items() if s and 200 <= s < 300) >= 50, statuses
    assert len([s for s in statuses if s and 400 <= s < 500]) >= 8, statuses

    response, _ = exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Connection: close\r\n\r\n")
    assert response.status == 200
    # Items the fuzzer added under its own ids go; then the gallery is as it was.
    added = [key for key in FUZZ_IDS if key in retriever]
    if added:
        retriever.delete(added)
    assert retriever.count == count_before
    assert search(server.port, query) == before
