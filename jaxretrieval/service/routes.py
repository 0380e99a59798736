"""The HTTP endpoints: search, match, live item updates, thumbnails, health, metrics and the
web page at `/`.

Every endpoint works through the `Service` that `create_app` stores on the app: the
Retriever, the settings, the micro-batcher, the metrics and the pool that decodes uploads.
A refused request raises ServiceError, which the app answers as
`{"error": {"code": ..., "message": ...}}`.
"""

import asyncio
import base64
import dataclasses
import hmac
import io
import json
import os
from typing import TYPE_CHECKING, Annotated
from urllib.parse import unquote

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.explain import NotExplainableError, UnknownStageError
from jaxretrieval.index import (BadFilterError, BadMetadataError, check_keys, checked_filter,
                                checked_metadata, normalised_vector, shown_key)
from jaxretrieval.retriever import NoThumbnailError, UnknownItemError
from jaxretrieval.service.backend import ServiceBackend, searches_inline
from jaxretrieval.service.batching import MicroBatcher, QueueFull
from jaxretrieval.service.decoding import BoundedPool, PoolFull
from jaxretrieval.service.errors import ServiceError
from jaxretrieval.service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from jaxretrieval.service.app import ServiceSettings

PAGE = os.path.join(os.path.dirname(__file__), "page.html")


@dataclasses.dataclass(frozen=True)
class Service:
    """What the endpoints work with; one per app, in `app.state.service`."""

    retriever: ServiceBackend  # a Retriever, or one over Ray deployments (jaxretrieval.rayserve)
    settings: "ServiceSettings"
    batcher: MicroBatcher
    metrics: ServiceMetrics
    decoder: BoundedPool
    solo: BoundedPool  # model work outside the batcher: explanations, clips


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
        return await decoded(service, service.retriever.decode_image, data,
                             max_pixels=service.settings.max_pixels)
    except JaxRetrievalError as err:
        raise ServiceError(400, "bad_image", str(err)) from None


async def decoded(service: Service, read, *args, **kwargs) -> np.ndarray:
    """`read(*args, **kwargs)`, a model input, made in the decoding pool: decoding, and for a
    face model finding and aligning the face, takes up to a core-second that would otherwise
    hold up every other request."""
    try:
        return await service.decoder.run(read, *args, **kwargs)
    except PoolFull:
        raise ServiceError(503, "overloaded",
                           "too many images are being decoded; retry in a moment") from None


async def run_solo(service: Service, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, model work outside the shared batcher, in the service's
    one-at-a-time pool."""
    try:
        return await service.solo.run(fn, *args, **kwargs)
    except PoolFull:
        raise ServiceError(503, "overloaded", "too many explanations or video searches are "
                           "waiting; retry in a moment") from None


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


def parse_metadata(value, what: str):
    """One item's metadata (a JSON object or null) as the index stores it."""
    try:
        return checked_metadata(value, what)
    except BadMetadataError as err:
        raise ServiceError(400, "bad_metadata", str(err)) from None


def parse_json_field(text, code: str, what: str):
    """A multipart form field holding JSON text ("" is null)."""
    if not isinstance(text, str):
        raise ServiceError(400, code, f"send {what} as a text field holding JSON")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ServiceError(400, code, f"{what} is not valid JSON") from None


def parse_filter(value):
    """A search filter (a JSON object of conditions, or null), checked."""
    try:
        checked_filter(value)
    except BadFilterError as err:
        raise ServiceError(400, "bad_filter", str(err)) from None
    return value


def hit(key: str, score: float, metadata) -> dict:
    """One search result as answered: the id, the score and any metadata."""
    result = {"id": shown_key(key), "score": score}
    if metadata is not None:
        result["metadata"] = metadata
    return result


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
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


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


def check_threshold(threshold: float | None) -> None:
    if threshold is not None and not np.isfinite(threshold):
        raise ServiceError(400, "bad_threshold", "threshold must be a finite number")


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


FILTER_SCHEMA = {
    "type": "object",
    "description": "Only items whose metadata passes every condition (AND): a field equal "
                   "to a value, or to one of `{\"in\": [values]}`. A field holding a list "
                   "passes when any element does. Invalid: 400 `bad_filter`.",
    "additionalProperties": True,
    "example": {"label": "cat", "year": {"in": [2023, 2024]}},
}
METADATA_SCHEMA = {
    "type": "object",
    "description": "At most 4,096 bytes of JSON: string field names; values strings, numbers, "
                   "booleans, null or flat lists of those. Invalid: 400 `bad_metadata`.",
    "additionalProperties": True,
    "example": {"label": "cat", "year": 2024},
}
SEARCH_BODY = {"requestBody": {"content": {
    "application/json": {
        "schema": {"type": "object", "required": ["embedding"],
                   "properties": {"embedding": {"type": "array", "items": {"type": "number"}},
                                  "filter": FILTER_SCHEMA}},
        "example": {"embedding": [0.1, 0.2], "filter": {"label": "cat"}}},
    "multipart/form-data": {
        "schema": {"type": "object", "required": ["image"],
                   "properties": {"image": {"type": "string", "format": "binary"},
                                  "filter": {"type": "string",
                                             "description": "the filter as JSON text",
                                             "example": "{\"label\": \"cat\"}"}}}},
}}}
ITEMS_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {
        "type": "object", "required": ["items"],
        "properties": {"items": {"type": "array", "items": {
            "type": "object", "required": ["id", "embedding"],
            "properties": {"id": {"type": "string"},
                           "embedding": {"type": "array", "items": {"type": "number"}},
                           "metadata": METADATA_SCHEMA}}}}}},
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["id", "image"],
        "properties": {"id": {"type": "array", "items": {"type": "string"}},
                       "image": {"type": "array",
                                 "items": {"type": "string", "format": "binary"}},
                       "metadata": {"type": "array", "items": {"type": "string"},
                                    "description": "optional: one per id, JSON text "
                                                   "(an object, or empty for none)"}}}},
}}}


@router.post("/search", summary="The k nearest gallery items of one image or embedding",
             description="Send multipart field `image` (a file) or JSON "
                         "`{\"embedding\": [...]}`, and optionally a `filter` on the items' "
                         "metadata (JSON field; in multipart a text field holding JSON): "
                         "the results are then the k nearest items that pass it. Results "
                         "are best first, each with its `metadata` if the item has some.",
             openapi_extra=SEARCH_BODY)
async def search(request: Request, service: ServiceDep, k: int = 10,
                 threshold: float | None = None):
    check_k(service, k)
    check_threshold(threshold)
    if is_multipart(request):
        form = await form_of(service, request)
        conditions = parse_filter(parse_json_field(form.get("filter", ""), "bad_filter",
                                                   "the filter"))
        vector = (await embed(service, [await read_upload(service, form.get("image"))]))[0]
    else:
        body = await json_body(request)
        if "embedding" not in body:
            raise ServiceError(400, "missing_field",
                               "send multipart field `image` or JSON {\"embedding\": [...]}")
        conditions = parse_filter(body.get("filter"))
        vector = parse_embedding(service, body["embedding"])
    retriever = service.retriever
    run = lambda: retriever.search_embeddings(vector[None], k, threshold=threshold,
                                              filter=conditions, with_metadata=True)
    keys, scores, metadata = run() if searches_inline(retriever) else await run_in_threadpool(run)
    return {"results": [hit(key, score, item)
                        for key, score, item in zip(keys[0], scores[0], metadata[0])]}


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
             description="Multipart fields `id` and `image`, repeated in pairs (optionally "
                         "with a `metadata` text field of JSON per pair), or JSON "
                         "`{\"items\": [{\"id\": ..., \"embedding\": [...], \"metadata\": "
                         "{...}}]}` (`metadata` optional). An item replaced without "
                         "metadata has none.",
             openapi_extra=ITEMS_BODY)
async def upsert_items(request: Request, service: ServiceDep):
    require_key(service, request)
    if is_multipart(request):
        form = await form_of(service, request)
        ids, uploads = form.getlist("id"), form.getlist("image")
        if not ids or len(ids) != len(uploads):
            raise ServiceError(400, "missing_field",
                               "send `id` and `image` fields in pairs, at least one pair")
        check_ids(ids)  # before the images are embedded
        texts = form.getlist("metadata")
        if texts and len(texts) != len(ids):
            raise ServiceError(400, "bad_metadata",
                               f"{len(ids)} ids but {len(texts)} `metadata` fields: send one "
                               "per id (an empty one for an item without metadata), or none")
        metadata = [parse_metadata(parse_json_field(text, "bad_metadata",
                                                    f"the metadata of item {row}"),
                                   f"the metadata of item {row}")
                    for row, text in enumerate(texts)] or None
        check_image_count(service, len(uploads))
        vectors = await embed(service, [await read_upload(service, u) for u in uploads])
    else:
        items = (await json_body(request)).get("items")
        if not isinstance(items, list) or not items or not all(
                isinstance(i, dict) and "id" in i and "embedding" in i for i in items):
            raise ServiceError(400, "missing_field",
                               "send {\"items\": [{\"id\": ..., \"embedding\": [...]}]}")
        ids = check_ids([item["id"] for item in items])
        metadata = [parse_metadata(item.get("metadata"), f"the metadata of item {row}")
                    for row, item in enumerate(items)]
        vectors = np.stack([parse_embedding(service, item["embedding"]) for item in items])
    retriever = service.retriever
    await run_in_threadpool(retriever.upsert_embeddings, ids, np.asarray(vectors, np.float32),
                            metadata=metadata)
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
        image = await decoded(service, service.retriever.thumbnail, item_id,
                              data_dir=service.settings.data_dir)
    except UnknownItemError as err:
        raise ServiceError(404, "unknown_id", str(err)) from None
    except JaxRetrievalError as err:
        raise ServiceError(404, "no_image", str(err)) from None
    out = io.BytesIO()
    image.save(out, format="PNG")
    return Response(out.getvalue(), media_type="image/png")


def png_base64(image: np.ndarray) -> str:
    """A uint8 image array as a base64 PNG."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


async def gallery_input(service: Service, item_id) -> np.ndarray:
    """A gallery item's image (where its thumbnail is read from) as the model's input."""
    item_id = check_ids([item_id])[0]
    try:
        return await decoded(service, service.retriever.item_input, item_id,
                             data_dir=service.settings.data_dir)
    except UnknownItemError as err:
        raise ServiceError(404, "unknown_id", str(err)) from None
    except NoThumbnailError as err:
        raise ServiceError(404, "no_image", str(err)) from None
    except JaxRetrievalError as err:
        raise ServiceError(400, "bad_image", str(err)) from None


@router.post(
    "/explain", summary="Which parts of two images carry their similarity",
    description="Multipart fields `image_a` and `image_b` (two files), or `image` (a file) "
                "and `id` (a gallery item, whose image is read where its thumbnail is). "
                "Answers `similarity`, `same` and `threshold` as /match does (`threshold` "
                "in the query overrides the calibrated one); `stage`: the backbone stage "
                "whose feature map the heat is over (`stage` in the query names one, e.g. "
                "`stage2`, or `final` for the map the head pools; default: the deepest "
                "stage of at least 16x16 positions, see docs/explain.md; an unknown one is "
                "400 `bad_stage`, naming the model's stages); `method`: `exact` (the heat "
                "of each image adds up to the similarity; the final stage of an "
                "average-pooled linear head) or `grad_x_activation` (gradient x activation "
                "of the similarity); `heatmaps`: per image, the heat of each position of "
                "that feature map, rows of floats (positive adds to the similarity); "
                "`overlays`: per image, a base64 PNG of the heat drawn "
                "on the image as the model sees it (a face model's aligned chip), red above "
                "the image's mean heat and blue below it, on one scale for the pair. Images "
                "are in "
                "the order a, b (`image` first when `id` is given).")
async def explain(request: Request, service: ServiceDep, threshold: float | None = None,
                  stage: str | None = None):
    check_threshold(threshold)
    if not is_multipart(request):
        raise ServiceError(400, "missing_field",
                           "send multipart fields image_a and image_b, or image and id")
    form = await form_of(service, request)
    if form.get("id") is not None:
        images = [await read_upload(service, form.get("image")),
                  await gallery_input(service, form.get("id"))]
    else:
        images = [await read_upload(service, form.get("image_a")),
                  await read_upload(service, form.get("image_b"))]
    try:
        result = await run_solo(service, service.retriever.explain_uint8, *images,
                                threshold=threshold, stage=stage)
    except UnknownStageError as err:
        raise ServiceError(400, "bad_stage", str(err)) from None
    except NotExplainableError as err:
        raise ServiceError(501, "not_implemented", str(err)) from None
    overlays = await run_in_threadpool(lambda: [png_base64(o) for o in result.overlays])
    return {"similarity": result.similarity, "same": result.same,
            "threshold": result.threshold, "method": result.method, "stage": result.stage,
            "heatmaps": [heat.tolist() for heat in result.heatmaps], "overlays": overlays}
