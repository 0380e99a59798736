"""The request guard: what every request must satisfy before an endpoint sees it.

- **Host.** The Host header must name this server (see `allowed_host_names`), so that a
  web page whose domain an attacker points at 127.0.0.1 (DNS rebinding) cannot reach it.
- **Content type.** A body-carrying request (POST, PUT, PATCH) must be
  `application/json` (UTF-8) or `multipart/form-data` with a boundary. Browsers send
  `text/plain` and urlencoded forms from any page without asking the server first;
  refusing them keeps other web pages from writing to the gallery.
- **Origin.** Browsers send a multipart form from any page without asking first too, and
  with the server's own Host. A writing request (POST, PUT, PATCH, DELETE) that a browser
  marks as coming from another site (`Origin` naming another host, or `Sec-Fetch-Site:
  cross-site`) is refused with 403; programs such as curl send neither header.
- **Size.** Bodies are counted as they arrive, whatever Content-Length says (chunked
  bodies have none): over the cap for their type the request is refused with 413.
- **Time.** The whole body must arrive within `body_timeout_s` of the request's start.

A refused request is answered in the service's error shape with `connection: close`, after
reading (and dropping) at most DRAIN_BYTES more of its body for at most DRAIN_SECONDS, so
that a client still sending has finished and reads the answer instead of a reset. An
endpoint's answer given before the body was read waits for the same bounded drain, and
closes the connection if the body is not over by then.
"""

import asyncio
import ipaddress
import time
import urllib.parse

from starlette.requests import ClientDisconnect

from jaxretrieval.service.errors import ServiceError, error_json

DRAIN_BYTES = 4 << 20
DRAIN_SECONDS = 2.0
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
WRITE_METHODS = BODY_METHODS | {"DELETE"}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


def allowed_host_names(bind_host: str, allowed_hosts) -> frozenset | None:
    """The Host names (without port) a server bound to `bind_host` answers; None: any.

    Bound to loopback: localhost, 127.0.0.1 and [::1]. Bound to one address or name: that
    one. Bound to every address (0.0.0.0, ::): the loopback names, as clients on the
    machine itself use them. `allowed_hosts` adds names; "*" allows any Host (unsafe: DNS
    rebinding then works).
    """
    extra = {name.strip().lower() for name in allowed_hosts if name.strip()}
    if "*" in extra:
        return None
    names = set(LOOPBACK_NAMES)
    host = bind_host.strip().lower().strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and not (address.is_loopback or address.is_unspecified):
        names = {f"[{address}]" if address.version == 6 else str(address)}
    elif address is None and host not in ("", "localhost"):
        names = {host}
    return frozenset(names | {_bracketed(name) for name in extra})


def _bracketed(name: str) -> str:
    """An IPv6 address as a Host header writes it, with brackets."""
    try:
        return f"[{ipaddress.IPv6Address(name.strip('[]'))}]"
    except ValueError:
        return name


def host_name(value: str) -> str | None:
    """The name in a Host header value, lowercase and without port; None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name += "]"
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            return None
    else:
        name, _, port = value.partition(":")
        port = port if _ else None
    if not name or (port is not None and not port.isdigit()):
        return None
    return _bracketed(name) if name.startswith("[") else name


def content_type_refusal(value: str) -> ServiceError | None:
    """Why a body's Content-Type is refused, or None if it is JSON or multipart."""
    kind, *params = [part.strip() for part in value.split(";")]
    kind = kind.lower()
    options = {}
    for param in params:
        key, _, val = param.partition("=")
        options[key.strip().lower()] = val.strip().strip('"')
    if kind == "application/json":
        if options.get("charset", "utf-8").lower() in ("utf-8", "utf8"):
            return None
        return ServiceError(415, "unsupported_media_type", "JSON bodies must be UTF-8; send "
                            "content-type application/json")
    if kind == "multipart/form-data":
        if options.get("boundary"):
            return None
        return ServiceError(415, "unsupported_media_type",
                            "multipart/form-data needs its boundary parameter")
    shown = repr(value) if value else "none"
    return ServiceError(415, "unsupported_media_type",
                        f"send content-type application/json or multipart/form-data (got "
                        f"{shown})")


class BodyRefused(Exception):
    """Raised from the guarded `receive`: the body broke its size or time limit."""


class RequestGuard:
    """ASGI middleware enforcing the Host rule, content types, body caps and the body
    timeout (see the module's docstring); everything else passes through unchanged."""

    def __init__(self, app, *, hosts: frozenset | None, max_json_bytes: int,
                 max_multipart_bytes: int, body_timeout_s: float):
        self.app, self.hosts = app, hosts
        self.max_json_bytes, self.max_multipart_bytes = max_json_bytes, max_multipart_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        deadline = time.monotonic() + self.body_timeout_s
        has_body = "transfer-encoding" in headers or headers.get("content-length", "0") != "0"
        content_type = headers.get("content-type", "")
        cap = (self.max_multipart_bytes if content_type.lower().startswith("multipart/")
               else self.max_json_bytes)
        refusal = self.refusal_of_head(scope, headers, has_body, cap)
        if refusal is not None:
            # A client waiting for "100 Continue" has sent no body: answer it at once (the
            # first receive would tell it to send).
            if has_body and headers.get("expect", "").lower() != "100-continue":
                await _drain(receive, deadline)
            return await _answer(send, refusal)

        state = {"received": 0, "complete": not has_body, "refusal": None, "started": False,
                 "gone": False}

        async def guarded_receive():
            if state["refusal"] is not None:
                raise BodyRefused()
            if state["complete"]:
                # After the body, a receive waits for the client to leave (a streamed
                # response listens so): no body deadline applies to that.
                return await receive()
            remaining = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    message = await receive()
            except TimeoutError:
                state["refusal"] = ServiceError(
                    408, "timeout", f"the body did not arrive within {self.body_timeout_s:g} "
                    "seconds; send it whole, promptly")
                raise BodyRefused() from None
            if message["type"] == "http.disconnect":
                state["gone"] = True
            elif message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    state["complete"] = True
                if state["received"] > cap:
                    state["refusal"] = _too_large(cap, content_type)
                    raise BodyRefused()
            return message

        async def guarded_send(message):
            if state["refusal"] is not None:
                return  # the refusal is answered below, whatever the endpoint made of it
            if message["type"] == "http.response.start":
                state["started"] = True
                # An answer before the body is read (a 401, a 404): read the rest first, or
                # closing with it unread resets the connection, and the client may lose the
                # answer. But only so much: past that, close without reading on.
                # A client waiting for "100 Continue" that has sent nothing is not asked for
                # its body (the first receive would ask): the connection just closes.
                waiting = (headers.get("expect", "").lower() == "100-continue"
                           and state["received"] == 0)
                if not state["complete"] and not state["gone"] and not waiting:
                    state["complete"] = await _drain(receive, time.monotonic() + DRAIN_SECONDS)
                if not state["complete"]:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except BodyRefused:
            if state["refusal"] is None:
                raise
        except ClientDisconnect:
            # The client left (or the protocol refused the rest of its request and
            # answered): there is no one to answer.
            if not state["gone"]:
                raise
        refusal = state["refusal"]
        if refusal is not None:
            if refusal.status == 413 and not state["complete"]:
                await _drain(receive, time.monotonic() + DRAIN_SECONDS)
            if not state["started"]:
                await _answer(send, refusal)

    def from_another_site(self, headers) -> bool:
        """Whether a browser says the request comes from a page of another site: one whose
        host is neither this request's Host nor an allowed name. Under `--allowed-hosts '*'`
        (behind a proxy that checks names itself) no name is checked here either."""
        if self.hosts is None:
            return False
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return True
        origin = headers.get("origin")
        if origin is None:
            return False
        name = host_name(urllib.parse.urlsplit(origin.strip()).netloc)
        if name is None:  # "null" (a sandboxed page, a file) or unreadable
            return True
        return name != host_name(headers.get("host", "")) and name not in self.hosts

    def refusal_of_head(self, scope, headers, has_body, cap) -> ServiceError | None:
        """Why the request is refused from its head alone, or None."""
        if self.hosts is not None:
            name = host_name(headers.get("host", ""))
            if name not in self.hosts:
                shown = repr(headers["host"]) if "host" in headers else "no Host header"
                names = ", ".join(sorted(self.hosts))
                return ServiceError(421, "bad_host", f"this server does not answer for "
                                    f"{shown}; use one of its names ({names}) or start it "
                                    "with --allowed-hosts")
        if scope["method"] in WRITE_METHODS and self.from_another_site(headers):
            return ServiceError(403, "cross_origin", "a web page of another site may not "
                                "write here; send writes from this service's page or a "
                                "program, or start it with --allowed-hosts naming that site")
        if scope["method"] in BODY_METHODS:
            refusal = content_type_refusal(headers.get("content-type", ""))
            if refusal is not None:
                return refusal
        length = headers.get("content-length", "")
        if has_body and length.isdigit() and int(length) > cap:
            return _too_large(cap, headers.get("content-type", ""))
        return None


def _headers(scope) -> dict:
    """The request's headers by lowercase name (the first of repeated ones), as text."""
    headers = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _too_large(cap: int, content_type: str) -> ServiceError:
    what = "multipart bodies" if content_type.lower().startswith("multipart/") else "bodies"
    return ServiceError(413, "too_large", f"{what} are limited to {cap} bytes; send less per "
                        "request")


async def _drain(receive, deadline: float) -> bool:
    """Reads and drops the rest of a body: at most DRAIN_BYTES, until `deadline`. Returns
    whether the body ended."""
    dropped = 0
    deadline = min(deadline, time.monotonic() + DRAIN_SECONDS)
    while dropped <= DRAIN_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            async with asyncio.timeout(remaining):
                message = await receive()
        except TimeoutError:
            return False
        if message["type"] != "http.request":
            return False
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


async def _answer(send, refusal: ServiceError) -> None:
    body = error_json(refusal.code, refusal.message)
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
