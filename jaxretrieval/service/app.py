"""The HTTP API over a Retriever (FastAPI): search, match, live item updates, thumbnails,
health and Prometheus metrics, and the web page at `/`.

Every error answers `{"error": {"code": ..., "message": ...}}` with a 4xx/5xx status. The
endpoints are in `routes.py`, the metrics in `metrics.py`; this module puts them together.
"""

import dataclasses
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.retriever import Retriever
from jaxretrieval.service.batching import MicroBatcher
from jaxretrieval.service.metrics import ObserveRequests, ServiceMetrics
from jaxretrieval.service.routes import Service, ServiceError, router


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


# Where the access log goes: `jaxretrieval serve` shows it on stderr.
ACCESS_LOGGER = "jaxretrieval.service.access"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def create_app(retriever: Retriever, settings: ServiceSettings = ServiceSettings()) -> FastAPI:
    """The service over `retriever`, whose index takes live updates (a writable index)."""
    app = FastAPI(title="jaxretrieval", summary="Image search and matching over a trained "
                  "CNN and a ScaNN index.")
    metrics = ServiceMetrics(retriever)
    batcher = MicroBatcher(retriever.embed_uint8, max_batch=settings.max_batch,
                           max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                           on_batch=metrics.batch_size.observe)
    app.state.batcher = batcher
    app.state.service = Service(retriever, settings, batcher, metrics)
    app.router.add_event_handler("shutdown", batcher.close)
    add_error_handlers(app)
    app.add_middleware(ObserveRequests, observe=metrics.observe_request)
    if settings.access_log:
        app.add_middleware(ObserveRequests, observe=log_request)
    app.include_router(router)
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
