"""The HTTP API over a Retriever (FastAPI): search, match, live item updates, thumbnails,
health and Prometheus metrics, and the web page at `/`.

Every error answers `{"error": {"code": ..., "message": ...}}` with a 4xx/5xx status. The
endpoints are in `routes.py`, the metrics in `metrics.py`; this module puts them together.
"""

import dataclasses
import logging
import os

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.service.backend import ServiceBackend
from jaxretrieval.service.batching import MicroBatcher
from jaxretrieval.service.decoding import BoundedPool
from jaxretrieval.service.docs_pages import add_docs_pages
from jaxretrieval.service.errors import ServiceError, error_body
from jaxretrieval.service.guards import RequestGuard, allowed_host_names
from jaxretrieval.service.metrics import ObserveRequests, ServiceMetrics
from jaxretrieval.service.routes import Service, router
from jaxretrieval.service.video_routes import video_router


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """The service's limits and options (`python -m serve` sets them from its flags)."""

    api_key: str | None = None  # required (header X-API-Key) for POST/DELETE /items
    max_k: int = 1000
    max_batch: int = 32  # images per compiled embedding call
    max_wait_ms: float = 2.0  # how long the first image of a batch waits for company
    max_queue: int = 256  # images waiting to be embedded; beyond it, 503
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    data_dir: str = ""  # TFDS data directory, for thumbnails of TFDS items
    access_log: bool = False  # one line per request on the ACCESS_LOGGER logger, at INFO
    # The Host rule (guards.allowed_host_names): the address the server binds, and more
    # names to answer for ("*": any, which lets DNS rebinding through).
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    # Body caps, counted as the bytes arrive. 1 MiB of JSON holds about 50,000 numbers: a
    # batch of 32 embeddings of up to 1,500 dimensions. Multipart: one batch of uploads plus
    # room for the other fields (0: the larger of max_upload_bytes * max_batch and
    # max_video_bytes, plus 1 MiB).
    max_json_bytes: int = 1 << 20
    max_multipart_bytes: int = 0
    header_timeout_s: float = 10.0  # the request line and headers, from the first byte
    body_timeout_s: float = 60.0  # the whole body, from the end of the headers
    # Threads decoding uploads (0: half the cores, at least 1) and uploads that may wait
    # for one; beyond that, 503.
    decode_threads: int = 0
    max_decode_queue: int = 64
    # Requests that run the model outside the shared batcher (/explain, /search/video) run
    # one at a time; this many more may wait, beyond which 503.
    max_solo_queue: int = 8
    # POST /search/video: the clip's bytes, its length in seconds, and the frames sampled
    # from it (each is embedded and searched).
    max_video_bytes: int = 64 * 1024 * 1024
    max_video_seconds: float = 600.0
    max_video_frames: int = 1200

    def __post_init__(self):
        for name in ("max_k", "max_batch", "max_queue", "max_upload_bytes", "max_pixels",
                     "max_json_bytes", "max_decode_queue", "max_solo_queue", "max_video_bytes",
                     "max_video_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise JaxRetrievalError(f"{name} must be a whole number of at least 1, "
                                        f"got {value!r}")
        for name in ("max_multipart_bytes", "decode_threads"):  # 0: the default
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise JaxRetrievalError(f"{name} must be a whole number (0 for the default), "
                                        f"got {value!r}")
        for name in ("header_timeout_s", "body_timeout_s", "max_video_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise JaxRetrievalError(f"{name} must be a positive number of seconds, "
                                        f"got {value!r}")
        if not self.max_multipart_bytes:
            object.__setattr__(self, "max_multipart_bytes", max(
                self.max_upload_bytes * self.max_batch, self.max_video_bytes) + (1 << 20))
        if not self.decode_threads:
            object.__setattr__(self, "decode_threads", max(1, (os.cpu_count() or 2) // 2))
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))


# Where the access log goes: `jaxretrieval serve` shows it on stderr.
ACCESS_LOGGER = "jaxretrieval.service.access"


def check_api_key(api_key: str | None) -> None:
    """Refuses a key that no client could send: HTTP headers carry ASCII, without
    surrounding spaces (which are stripped) or control characters."""
    if api_key is None:
        return
    if not api_key or not api_key.isascii() or not api_key.isprintable() \
            or api_key != api_key.strip():
        raise JaxRetrievalError(
            "the API key must be printable ASCII without leading or trailing spaces (HTTP "
            "headers cannot carry anything else, so no request could match it); choose "
            "another, e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`")


def create_app(retriever: ServiceBackend,
               settings: ServiceSettings = ServiceSettings()) -> FastAPI:
    """The service over `retriever`, whose index takes live updates (a writable index): a
    Retriever, or `jaxretrieval.rayserve.backend.start_ray_backend`'s Ray-backed one."""
    check_api_key(settings.api_key)
    app = FastAPI(title="jaxretrieval", summary="Image search and matching over a trained "
                  "CNN and a ScaNN index.", docs_url=None, redoc_url=None)
    metrics = ServiceMetrics(retriever)
    batcher = MicroBatcher(retriever.embed_uint8, max_batch=settings.max_batch,
                           max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                           on_batch=metrics.batch_size.observe)
    decoder = BoundedPool(settings.decode_threads, settings.max_decode_queue, "image-decode")
    # Explanations and clips run the model one request at a time: each is already a batch
    # that takes the cores, and running two at once only splits them.
    solo = BoundedPool(1, settings.max_solo_queue, "solo-model")
    app.state.batcher = batcher
    app.state.service = Service(retriever, settings, batcher, metrics, decoder, solo)
    app.router.add_event_handler("shutdown", batcher.close)
    app.router.add_event_handler("shutdown", decoder.close)
    app.router.add_event_handler("shutdown", solo.close)
    add_error_handlers(app)
    app.add_middleware(RequestGuard, hosts=allowed_host_names(settings.host,
                                                              settings.allowed_hosts),
                       max_json_bytes=settings.max_json_bytes,
                       max_multipart_bytes=settings.max_multipart_bytes,
                       body_timeout_s=settings.body_timeout_s)
    app.add_middleware(ObserveRequests, observe=metrics.observe_request)
    if settings.access_log:
        app.add_middleware(ObserveRequests, observe=log_request)
    app.include_router(router)
    app.include_router(video_router)
    add_docs_pages(app)
    return app


def log_request(scope, status: int, seconds: float) -> None:
    """Logs `METHOD PATH STATUS MS` for one request (an ObserveRequests observer)."""
    query = scope.get("query_string", b"").decode("latin-1")
    path = scope["path"] + (f"?{query}" if query else "")
    logging.getLogger(ACCESS_LOGGER).info("%s %s %d %.1f ms", scope["method"], path, status,
                                          seconds * 1000)


def add_error_handlers(app: FastAPI) -> None:
    """Answers every failure, expected or not, with the one error shape."""

    @app.exception_handler(ServiceError)
    async def service_error(request, err: ServiceError):
        return JSONResponse(error_body(err.code, err.message), status_code=err.status)

    @app.exception_handler(JaxRetrievalError)
    async def user_error(request, err: JaxRetrievalError):
        return JSONResponse(error_body("bad_request", str(err)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return JSONResponse(error_body("invalid_request", details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(error_body(code, str(err.detail)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):
        return JSONResponse(error_body("internal", f"{type(err).__name__}: {err}"),
                            status_code=500)
