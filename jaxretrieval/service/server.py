"""Running the app under uvicorn with limits on the request head.

uvicorn's httptools protocol waits for a request's head without limit of time or size, and
answers a malformed request with a plain-text 400. `GuardedProtocol` adds both limits and
answers every such refusal in the service's error shape:

- the head (request line and headers) must arrive within `header_timeout_s` of the
  connection opening or the request's first byte (408; a connection on which nothing
  came is closed without an answer);
- the request line's target is at most MAX_TARGET_BYTES (414), the whole head at most
  MAX_HEAD_BYTES (431);
- a request the parser cannot read is a 400 `bad_http`.

Bodies are limited by the request guard (guards.py), which sees them as the app reads them.
"""

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from jaxretrieval.service.errors import error_json

MAX_TARGET_BYTES = 8 * 1024
MAX_HEAD_BYTES = 64 * 1024
# Lets requests in flight finish at shutdown, but not wait for ever on a stalled client.
GRACEFUL_SHUTDOWN_S = 10


class HeadRefused(Exception):
    """Raised from a parser callback: the head broke a limit (the parser then stops)."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head timeout, head size limits, and refusals in
    the error shape. `protocol_class` makes one with a given timeout."""

    header_timeout_s = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._head_timer = None
        self._head_bytes = 0
        self._target_bytes = self._parsed_head_bytes = 0
        self._in_head = True
        self._refusal = None
        self._arm_head_timer()

    def connection_lost(self, exc):
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES \
                and not self.transport.is_closing():
            self._write_refusal(431, "head_too_large",
                         f"the request's headers exceed {MAX_HEAD_BYTES} bytes")

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._target_bytes = self._parsed_head_bytes = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._target_bytes += len(url)
        if self._target_bytes > MAX_TARGET_BYTES:
            self._refusal = (414, "uri_too_long",
                             f"the request target exceeds {MAX_TARGET_BYTES} bytes")
            raise HeadRefused()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # A head that arrives whole in one read is only seen here, header by header.
        self._parsed_head_bytes += len(name) + len(value) + 4
        if self._parsed_head_bytes + self._target_bytes > MAX_HEAD_BYTES:
            self._refusal = (431, "head_too_large",
                             f"the request's headers exceed {MAX_HEAD_BYTES} bytes")
            raise HeadRefused()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what follows is the next request's head

    # Refusals

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this when the parser fails, a callback's refusal included.
        status, code, message = self._refusal or (
            400, "bad_http", "the request is not valid HTTP/1.1; check its request line "
            "and headers")
        self._write_refusal(status, code, message)

    def _write_refusal(self, status: int, code: str, message: str) -> None:
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        body = error_json(code, message)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend([b"content-type: application/json\r\n",
                     b"content-length: " + str(len(body)).encode() + b"\r\n",
                     b"connection: close\r\n\r\n", body])
        self.transport.write(b"".join(head))
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes == 0:
            # Nothing of a request came: an idle connection (browsers open some ahead of
            # need) is closed quietly, as at the end of keep-alive, so that a client cannot
            # take a 408 as the answer to a request it sends at that moment.
            self.transport.close()
            return
        self._write_refusal(408, "timeout", f"the request's head did not arrive within "
                            f"{self.header_timeout_s:g} seconds")


def protocol_class(header_timeout_s: float) -> type:
    """A GuardedProtocol subclass with this head timeout, for uvicorn's `http=`."""
    return type("GuardedProtocol", (GuardedProtocol,), {"header_timeout_s": header_timeout_s})


def server_config(app, *, host: str, port: int, header_timeout_s: float,
                  log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's configuration for the service's app, with the guarded protocol."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=protocol_class(header_timeout_s),
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
