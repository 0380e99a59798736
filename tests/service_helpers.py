"""The service under real uvicorn, in a thread of the test process, and raw HTTP over a
socket: what the hardening and fuzz tests need to reach the HTTP layer itself."""

import json
import socket
import threading
import time

import uvicorn

from jaxretrieval.service.app import create_app
from jaxretrieval.service.server import server_config


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """`create_app(retriever, settings)` served by uvicorn, as `jaxretrieval serve` runs it,
    on a free port of 127.0.0.1; `stop` ends it."""

    def __init__(self, retriever, settings):
        self.port = free_port()
        self.app = create_app(retriever, settings)
        config = server_config(self.app, host="127.0.0.1", port=self.port,
                               header_timeout_s=settings.header_timeout_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Response({self.status}, {self.body[:300]!r})"


def parse_response(data: bytes, *, head_only: bool = False) -> Response | None:
    """The first response in `data`, or None if it is not complete yet. `head_only`: the
    answer to a HEAD request, whose Content-Length describes a body that is not sent."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only:
        return Response(status, headers, b"")
    if "content-length" in headers:
        length = int(headers["content-length"])
        return Response(status, headers, rest[:length]) if len(rest) >= length else None
    if headers.get("transfer-encoding") == "chunked":
        body, view = b"", rest
        while True:
            size_line, sep, view = view.partition(b"\r\n")
            if not sep:
                return None
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return Response(status, headers, body)
            if len(view) < size + 2:
                return None
            body, view = body + view[:size], view[size + 2:]
    return None


def exchange(port: int, raw: bytes, *, timeout: float = 10.0, shut_write: bool = False,
             head_only: bool = False):
    """Sends `raw` on a new connection and reads until the first response is whole or the
    server closes. Returns (Response or None, whether the server closed the connection).
    `shut_write`: close the sending side after `raw`; `head_only`: see parse_response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed = b"", False
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
            response = parse_response(data, head_only=head_only)
            if response is not None and "close" not in response.headers.get("connection", ""):
                break
        return parse_response(data, head_only=head_only), closed


def request_bytes(method: str, path: str, body: bytes = b"", *, host: str = "127.0.0.1",
                  content_type: str | None = None, headers: dict | None = None) -> bytes:
    """One HTTP/1.1 request with `Connection: close`."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def multipart(fields) -> tuple[bytes, str]:
    """A multipart/form-data body of (name, filename or None, bytes) fields."""
    boundary = "jaxretrievaltestboundary"
    parts = []
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
                     + (b"Content-Type: application/octet-stream\r\n" if filename else b"")
                     + b"\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"
