"""The HTTP API over a Retriever (FastAPI): search, match, live item updates, thumbnails,
health and Prometheus metrics, and the web page at `/`.

Every error answers `{"error": {"code": ..., "message": ...}}` with a 4xx/5xx status.
"""

import asyncio
import dataclasses
import hmac
import io
import os
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxretrieval.data.images import decode_image_bytes, to_model_input
from jaxretrieval.data.sources import read_source
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.service.batching import MicroBatcher, QueueFull

PAGE = os.path.join(os.path.dirname(__file__), "page.html")
THUMBNAIL_SIDE = 160
INLINE_SEARCH_MAX_ITEMS = 20_000


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    api_key: str | None = None  # required (header X-API-Key) for POST/DELETE /items
    max_k: int = 1000
    max_batch: int = 32  # images per compiled embedding call
    max_wait_ms: float = 2.0  # how long the first image of a batch waits for company
    max_queue: int = 256  # images waiting to be embedded; beyond it, 503
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    data_dir: str = ""  # TFDS data directory, for thumbnails of TFDS items


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def create_app(retriever, settings: ServiceSettings = ServiceSettings()) -> FastAPI:
    """The service over `retriever`, whose index takes live updates (a writable index)."""
    app = FastAPI(title="jaxretrieval", summary="Image search and matching over a trained "
                  "CNN and a ScaNN index.")
    metrics = _Metrics(retriever)
    embedder = retriever.embedder
    batcher = MicroBatcher(embedder.embed_uint8, max_batch=settings.max_batch,
                           max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                           on_batch=metrics.batch_size.observe)
    app.state.batcher = batcher
    app.router.add_event_handler("shutdown", batcher.close)

    # ------------------------------------------------------------------ errors and metrics
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

    app.add_middleware(_MeasureRequests, metrics=metrics)

    # ------------------------------------------------------------------ helpers
    async def read_upload(upload) -> np.ndarray:
        if upload is None or not hasattr(upload, "read"):
            raise ServiceError(400, "missing_field", "send the image as a multipart file field")
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ServiceError(413, "too_large",
                               f"uploads are limited to {settings.max_upload_bytes} bytes")
        if not data:
            raise ServiceError(400, "bad_image", "the uploaded file is empty")
        try:
            image = decode_image_bytes(data, max_pixels=settings.max_pixels)
        except JaxRetrievalError as err:
            raise ServiceError(400, "bad_image", str(err)) from None
        config = embedder.config
        return to_model_input(image, config.image_size, config.channels)

    async def embed(images: list) -> np.ndarray:
        try:
            future = batcher.submit(np.stack(images))
        except QueueFull:
            raise ServiceError(503, "overloaded",
                               "too many queries are waiting; retry in a moment") from None
        return await asyncio.wrap_future(future)

    def parse_embedding(values) -> np.ndarray:
        try:
            vector = np.asarray(values, np.float32)
        except (TypeError, ValueError):
            raise ServiceError(400, "bad_embedding", "embedding must be a list of numbers")
        if vector.ndim != 1 or vector.shape[0] != retriever.index.embedding_dim:
            raise ServiceError(400, "bad_embedding",
                               f"embedding must be {retriever.index.embedding_dim} numbers, "
                               f"got shape {list(vector.shape)}")
        if not np.all(np.isfinite(vector)):
            raise ServiceError(400, "bad_embedding", "embedding must hold finite numbers")
        norm = float(np.linalg.norm(vector))
        if norm == 0:
            raise ServiceError(400, "bad_embedding", "embedding must not be all zeros")
        return vector / norm

    async def json_body(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ServiceError(400, "bad_json", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ServiceError(400, "bad_json", "the JSON body must be an object")
        return body

    def is_multipart(request: Request) -> bool:
        return request.headers.get("content-type", "").startswith("multipart/form-data")

    async def form_of(request: Request):
        # Refuse an oversized body before Starlette spools it to disk: at most one batch of
        # images per request, plus room for the other fields.
        most = settings.max_upload_bytes * settings.max_batch + (1 << 20)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > most:
            raise ServiceError(413, "too_large", f"requests are limited to {most} bytes "
                               f"({settings.max_batch} images of {settings.max_upload_bytes})")
        try:
            return await request.form(max_part_size=settings.max_upload_bytes + 1)
        except Exception as err:  # malformed multipart bodies raise several types
            raise ServiceError(400, "bad_multipart", f"cannot parse the form ({err})") from None

    def require_key(request: Request):
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ServiceError(401, "unauthorized", "send the service's key in X-API-Key")

    def check_k(k: int):
        if not 1 <= k <= settings.max_k:
            raise ServiceError(400, "bad_k", f"k must be between 1 and {settings.max_k}")

    # ------------------------------------------------------------------ endpoints
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "items": retriever.index.count,
                "embedding_dim": retriever.index.embedding_dim,
                "match_threshold": retriever.match_threshold}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search", summary="The k nearest gallery items of one image or embedding",
              description="Send multipart field `image` (a file) or JSON "
                          "`{\"embedding\": [...]}`. Results are best first.")
    async def search(request: Request, k: int = 10, threshold: float | None = None):
        check_k(k)
        if threshold is not None and not np.isfinite(threshold):
            raise ServiceError(400, "bad_threshold", "threshold must be a finite number")
        if is_multipart(request):
            form = await form_of(request)
            vector = (await embed([await read_upload(form.get("image"))]))[0]
        else:
            body = await json_body(request)
            if "embedding" not in body:
                raise ServiceError(400, "missing_field",
                                   "send multipart field `image` or JSON {\"embedding\": [...]}")
            vector = parse_embedding(body["embedding"])
        search = lambda: retriever.search_embeddings(vector[None], k, threshold=threshold)
        # A small exact index answers in tens of microseconds: a thread hop would cost more.
        keys, scores = (search() if retriever.index.count <= INLINE_SEARCH_MAX_ITEMS
                        else await run_in_threadpool(search))
        return {"results": [{"id": key, "score": score} for key, score in zip(keys[0], scores[0])]}

    @app.post("/match", summary="Similarity of two images and whether they match",
              description="Multipart fields `image_a` and `image_b`.")
    async def match(request: Request):
        if not is_multipart(request):
            raise ServiceError(400, "missing_field", "send multipart fields image_a and image_b")
        form = await form_of(request)
        images = [await read_upload(form.get("image_a")), await read_upload(form.get("image_b"))]
        a, b = await embed(images)
        result = retriever.match_embeddings(a, b)
        return {"similarity": result.similarity, "same": result.same,
                "threshold": result.threshold}

    @app.post("/items", summary="Add or replace gallery items (needs X-API-Key if set)",
              description="Multipart fields `id` and `image`, repeated in pairs, or JSON "
                          "`{\"items\": [{\"id\": ..., \"embedding\": [...]}]}`.")
    async def upsert_items(request: Request):
        require_key(request)
        if is_multipart(request):
            form = await form_of(request)
            ids, uploads = form.getlist("id"), form.getlist("image")
            if not ids or len(ids) != len(uploads):
                raise ServiceError(400, "missing_field",
                                   "send `id` and `image` fields in pairs, at least one pair")
            vectors = await embed([await read_upload(u) for u in uploads])
        else:
            items = (await json_body(request)).get("items")
            if not isinstance(items, list) or not items or not all(
                    isinstance(i, dict) and "id" in i and "embedding" in i for i in items):
                raise ServiceError(400, "missing_field",
                                   "send {\"items\": [{\"id\": ..., \"embedding\": [...]}]}")
            ids = [item["id"] for item in items]
            vectors = np.stack([parse_embedding(item["embedding"]) for item in items])
        if not all(isinstance(i, str) and i for i in ids):
            raise ServiceError(400, "bad_id", "every id must be a non-empty string")
        await run_in_threadpool(retriever.index.upsert, ids, np.asarray(vectors, np.float32))
        return {"upserted": len(ids), "items": retriever.index.count}

    @app.delete("/items/{item_id:path}", summary="Remove a gallery item (needs X-API-Key if set)")
    async def delete_item(item_id: str, request: Request):
        require_key(request)
        if item_id not in retriever.index.keys_set:
            raise ServiceError(404, "unknown_id", f"no item with id {item_id!r}")
        await run_in_threadpool(retriever.index.delete, [item_id])
        return {"deleted": item_id, "items": retriever.index.count}

    @app.get("/items/{item_id:path}/thumbnail", summary="A small PNG of an item's image")
    async def thumbnail(item_id: str):
        if item_id not in retriever.index.keys_set:
            raise ServiceError(404, "unknown_id", f"no item with id {item_id!r}")
        source = retriever.index.source_of(item_id)
        if not source:
            raise ServiceError(404, "no_image", f"item {item_id!r} has no stored image")
        try:
            image = await run_in_threadpool(read_source, source, settings.data_dir)
        except JaxRetrievalError as err:
            raise ServiceError(404, "no_image", str(err)) from None
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        if max(image.size) < 64:  # tiny sources (8x8 digits) are blown up to be visible
            scale = 64 // max(image.size)
            image = image.resize((image.width * scale, image.height * scale), 0)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return Response(out.getvalue(), media_type="image/png")

    return app


class _MeasureRequests:
    """Counts and times every request (plain ASGI: Starlette's BaseHTTPMiddleware costs about
    as much as a small search)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], endpoint, status[0],
                                 time.perf_counter() - start)


class _Metrics:
    """Prometheus series: requests, errors, latency, embedding batch sizes, index size."""

    def __init__(self, retriever):
        self.registry = CollectorRegistry()
        self.requests = Counter("jaxretrieval_requests", "HTTP requests",
                                ["method", "endpoint", "status"], registry=self.registry)
        self.errors = Counter("jaxretrieval_request_errors", "HTTP requests answered 4xx/5xx",
                              ["method", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "jaxretrieval_request_latency_seconds", "Time to answer a request",
            ["method", "endpoint"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.batch_size = Histogram(
            "jaxretrieval_embed_batch_size", "Images per compiled embedding call",
            registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        items = Gauge("jaxretrieval_index_items", "Items in the index", registry=self.registry)
        items.set_function(lambda: retriever.index.count)

    def observe(self, method, endpoint, status, seconds):
        self.requests.labels(method, endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(method, endpoint, str(status)).inc()
        self.latency.labels(method, endpoint).observe(seconds)
