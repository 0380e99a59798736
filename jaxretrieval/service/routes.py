"""The HTTP endpoints: search, match, live item updates, thumbnails, health, metrics and the
web page at `/`.

Every endpoint works through the `Service` that `create_app` stores on the app: the
Retriever, the settings, the micro-batcher, the metrics and the pool that decodes uploads.
A refused request raises ServiceError, which the app answers as
`{"error": {"code": ..., "message": ...}}`.
"""

import asyncio
import dataclasses
import hmac
import io
import os
from typing import TYPE_CHECKING, Annotated
from urllib.parse import unquote

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import check_keys, normalised_vector, shown_key
from jaxretrieval.retriever import Retriever, UnknownItemError
from jaxretrieval.service.batching import MicroBatcher, QueueFull
from jaxretrieval.service.decoding import DecodePool, PoolFull
from jaxretrieval.service.errors import ServiceError
from jaxretrieval.service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from jaxretrieval.service.app import ServiceSettings

PAGE = os.path.join(os.path.dirname(__file__), "page.html")
# A small exact index answers in tens of microseconds, less than a hop to a worker thread
# costs; larger ones search in a thread so that the event loop keeps serving.
INLINE_SEARCH_MAX_ITEMS = 20_000


@dataclasses.dataclass(frozen=True)
class Service:
    """What the endpoints work with; one per app, in `app.state.service`."""

    retriever: Retriever
    settings: "ServiceSettings"
    batcher: MicroBatcher
    metrics: ServiceMetrics
    decoder: DecodePool


def service_of(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service_of)]
router = APIRouter()


# ---------------------------------------------------------------------- request parts

async def read_upload(service: Service, upload) -> np.ndarray:
    """An uploaded image file as the model's uint8 input."""
    if upload is None or not hasattr(upload, "read"):
        raise ServiceError(400, "missing_field", "send the image as a multipart file field")
    limit = service.settings.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ServiceError(413, "too_large", f"uploads are limited to {limit} bytes")
    if not data:
        raise ServiceError(400, "bad_image", "the uploaded file is empty")
    try:
        # In the decoding pool: decoding, and for a face model finding and aligning the
        # face, takes up to a core-second that would otherwise hold up every other request.
        return await service.decoder.run(service.retriever.decode_image, data,
                                         max_pixels=service.settings.max_pixels)
    except PoolFull:
        raise ServiceError(503, "overloaded",
                           "too many images are being decoded; retry in a moment") from None
    except JaxRetrievalError as err:
        raise ServiceError(400, "bad_image", str(err)) from None


def check_image_count(service: Service, count: int) -> None:
    """Refuses more images in one request than the embedding queue holds: they could
    never be queued together, so retrying would not help."""
    most = service.settings.max_queue
    if count > most:
        raise ServiceError(413, "too_many_images",
                           f"{count} images in one request; send at most {most} (the "
                           "service's --max-queue) per request")


async def embed(service: Service, images: list) -> np.ndarray:
    """Embeddings of model inputs, computed in a batch shared with concurrent requests."""
    check_image_count(service, len(images))
    try:
        future = service.batcher.submit(np.stack(images))
    except QueueFull:
        raise ServiceError(503, "overloaded",
                           "too many queries are waiting; retry in a moment") from None
    return await asyncio.wrap_future(future)


def parse_embedding(service: Service, values) -> np.ndarray:
    """A JSON list of numbers as a unit float32 vector of the gallery's dimension."""
    try:
        return normalised_vector(values, service.retriever.embedding_dim)
    except JaxRetrievalError as err:
        raise ServiceError(400, "bad_embedding", str(err)) from None


def check_ids(ids: list) -> list:
    """`ids`, checked by the index's own rule for keys."""
    try:
        return check_keys(ids, "ids")
    except JaxRetrievalError as err:
        raise ServiceError(400, "bad_id", str(err)) from None


def path_id(request: Request, item_id: str, suffix: str = "") -> str:
    """The item id in `/items/{id}{suffix}`, percent-decoded exactly once from the path as
    sent, so `%2F` is a `/` inside the id and `%25` a `%` (some servers and test clients
    decode the path twice)."""
    raw = request.scope.get("raw_path")
    if not raw:
        return item_id
    raw = raw.decode("latin-1")
    start = raw.find("/items/")
    if start < 0 or not raw.endswith(suffix):
        return item_id
    return unquote(raw[start + len("/items/"):len(raw) - len(suffix)])


async def json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise ServiceError(400, "bad_json", "the body is not valid JSON") from None
    except RecursionError:  # the parser gives up on deep nesting before the stack does
        raise ServiceError(400, "bad_json", "the JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise ServiceError(400, "bad_json", "the JSON body must be an object")
    return body


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def form_of(service: Service, request: Request):
    # The request guard has capped the body (max_multipart_bytes) as it arrives.
    try:
        return await request.form(max_part_size=service.settings.max_upload_bytes + 1)
    except Exception as err:  # malformed multipart bodies raise several types
        raise ServiceError(400, "bad_multipart", f"cannot parse the form ({err})") from None


def require_key(service: Service, request: Request) -> None:
    api_key = service.settings.api_key
    if api_key is None:
        return
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ServiceError(401, "unauthorized", "send the service's key in X-API-Key")


def check_k(service: Service, k: int) -> None:
    if not 1 <= k <= service.settings.max_k:
        raise ServiceError(400, "bad_k", f"k must be between 1 and {service.settings.max_k}")


# ---------------------------------------------------------------------- endpoints

@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    with open(PAGE, encoding="utf-8") as f:
        return f.read()


@router.get("/healthz", summary="Status, gallery size and the limits clients need",
            description="`items`: gallery size; `embedding_dim`: the length `/search` and "
                        "`/items` take; `match_threshold`: the calibrated similarity at which "
                        "two images match (null if none); `max_k`: the largest `k` `/search` "
                        "takes.")
async def healthz(service: ServiceDep):
    retriever = service.retriever
    return {"status": "ok", "items": retriever.count, "embedding_dim": retriever.embedding_dim,
            "match_threshold": retriever.match_threshold, "max_k": service.settings.max_k}


@router.get("/metrics", include_in_schema=False)
async def prometheus(service: ServiceDep):
    return Response(service.metrics.exposition(), media_type=service.metrics.content_type)


@router.post("/search", summary="The k nearest gallery items of one image or embedding",
             description="Send multipart field `image` (a file) or JSON "
                         "`{\"embedding\": [...]}`. Results are best first.")
async def search(request: Request, service: ServiceDep, k: int = 10,
                 threshold: float | None = None):
    check_k(service, k)
    if threshold is not None and not np.isfinite(threshold):
        raise ServiceError(400, "bad_threshold", "threshold must be a finite number")
    if is_multipart(request):
        form = await form_of(service, request)
        vector = (await embed(service, [await read_upload(service, form.get("image"))]))[0]
    else:
        body = await json_body(request)
        if "embedding" not in body:
            raise ServiceError(400, "missing_field",
                               "send multipart field `image` or JSON {\"embedding\": [...]}")
        vector = parse_embedding(service, body["embedding"])
    retriever = service.retriever
    run = lambda: retriever.search_embeddings(vector[None], k, threshold=threshold)
    keys, scores = (run() if retriever.count <= INLINE_SEARCH_MAX_ITEMS
                    else await run_in_threadpool(run))
    return {"results": [{"id": shown_key(key), "score": score}
                        for key, score in zip(keys[0], scores[0])]}


@router.post("/match", summary="Similarity of two images and whether they match",
             description="Multipart fields `image_a` and `image_b`.")
async def match(request: Request, service: ServiceDep):
    if not is_multipart(request):
        raise ServiceError(400, "missing_field", "send multipart fields image_a and image_b")
    form = await form_of(service, request)
    images = [await read_upload(service, form.get("image_a")),
              await read_upload(service, form.get("image_b"))]
    a, b = await embed(service, images)
    result = service.retriever.match_embeddings(a, b)
    return {"similarity": result.similarity, "same": result.same,
            "threshold": result.threshold}


@router.post("/items", summary="Add or replace gallery items (needs X-API-Key if set)",
             description="Multipart fields `id` and `image`, repeated in pairs, or JSON "
                         "`{\"items\": [{\"id\": ..., \"embedding\": [...]}]}`.")
async def upsert_items(request: Request, service: ServiceDep):
    require_key(service, request)
    if is_multipart(request):
        form = await form_of(service, request)
        ids, uploads = form.getlist("id"), form.getlist("image")
        if not ids or len(ids) != len(uploads):
            raise ServiceError(400, "missing_field",
                               "send `id` and `image` fields in pairs, at least one pair")
        check_ids(ids)  # before the images are embedded
        check_image_count(service, len(uploads))
        vectors = await embed(service, [await read_upload(service, u) for u in uploads])
    else:
        items = (await json_body(request)).get("items")
        if not isinstance(items, list) or not items or not all(
                isinstance(i, dict) and "id" in i and "embedding" in i for i in items):
            raise ServiceError(400, "missing_field",
                               "send {\"items\": [{\"id\": ..., \"embedding\": [...]}]}")
        ids = check_ids([item["id"] for item in items])
        vectors = np.stack([parse_embedding(service, item["embedding"]) for item in items])
    retriever = service.retriever
    await run_in_threadpool(retriever.upsert_embeddings, ids, np.asarray(vectors, np.float32))
    return {"upserted": len(ids), "items": retriever.count}


@router.delete("/items/{item_id:path}",
               summary="Remove a gallery item (needs X-API-Key if set)")
async def delete_item(item_id: str, request: Request, service: ServiceDep):
    require_key(service, request)
    retriever = service.retriever
    item_id = path_id(request, item_id)
    try:
        await run_in_threadpool(retriever.delete, [item_id])
    except UnknownItemError as err:
        raise ServiceError(404, "unknown_id", str(err)) from None
    return {"deleted": item_id, "items": retriever.count}


@router.get("/items/{item_id:path}/thumbnail", summary="A small PNG of an item's image")
async def thumbnail(item_id: str, request: Request, service: ServiceDep):
    item_id = path_id(request, item_id, "/thumbnail")
    try:
        image = await run_in_threadpool(service.retriever.thumbnail, item_id,
                                        data_dir=service.settings.data_dir)
    except UnknownItemError as err:
        raise ServiceError(404, "unknown_id", str(err)) from None
    except JaxRetrievalError as err:
        raise ServiceError(404, "no_image", str(err)) from None
    out = io.BytesIO()
    image.save(out, format="PNG")
    return Response(out.getvalue(), media_type="image/png")
