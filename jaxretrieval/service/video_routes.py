"""`POST /search/video`: the videos that hold an uploaded clip (or image), and where.

The clip is read up to the service's `max_video_bytes`, decoded in the decoding pool with
its frames sampled as the gallery's were (refused past `max_video_seconds` or `max_pixels`
a frame, before the rest is decoded), embedded in one call, and ranked by the voting of
jaxretrieval.video.voting. Refusals: 413 for too many bytes, seconds, frames or pixels a
frame, 400 for a body without a `video` file or one FFmpeg cannot decode as one of the
formats of jaxretrieval.video.decode.FORMAT_WHITELIST, 415 for a body that is not multipart.
"""

from fastapi import APIRouter, Request

from jaxretrieval.service.errors import ServiceError
from jaxretrieval.service.routes import ServiceDep, check_k, decoded, is_multipart, run_solo
from jaxretrieval.video.decode import Limits, VideoDecodeError, VideoLimitError
from jaxretrieval.video.voting import search_clip_embeddings

video_router = APIRouter()

VIDEO_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["video"], "properties": {
        "video": {"type": "string", "format": "binary",
                  "description": "a clip (MP4, WebM, MKV, ...) or one image"}}}}}}}


async def read_video_upload(service, request: Request) -> bytes:
    settings = service.settings
    if not is_multipart(request):
        raise ServiceError(415, "unsupported_media_type",
                           "send the clip as multipart/form-data field `video`")
    try:
        form = await request.form(max_part_size=settings.max_video_bytes + 1)
    except Exception as err:  # a part past max_part_size, or a malformed body
        if "size" in str(err).lower():
            raise ServiceError(413, "too_large", "video uploads are limited to "
                               f"{settings.max_video_bytes} bytes") from None
        raise ServiceError(400, "bad_multipart", f"cannot parse the form ({err})") from None
    upload = form.get("video")
    if upload is None or not hasattr(upload, "read"):
        raise ServiceError(400, "missing_field", "send the clip as multipart file field `video`")
    data = await upload.read(settings.max_video_bytes + 1)
    if len(data) > settings.max_video_bytes:
        raise ServiceError(413, "too_large",
                           f"video uploads are limited to {settings.max_video_bytes} bytes")
    if not data:
        raise ServiceError(400, "bad_video", "the uploaded file is empty")
    return data


@video_router.post(
    "/search/video", summary="The videos holding a clip or an image, and where",
    description="Send multipart file field `video`: a clip (its frames sampled as the "
                "gallery's videos were, voted on over video, speed 0.8x-1.25x and offset) or "
                "one image (each video scores its best frame). Results are best first, each "
                "`{video, score, offset, speed, frames: [{id, time}]}`, `offset` the "
                "video's time in seconds at the clip's start (docs/video.md).",
    openapi_extra=VIDEO_BODY)
async def search_video(request: Request, service: ServiceDep, k: int = 10):
    check_k(service, k)
    data = await read_video_upload(service, request)
    settings, retriever = service.settings, service.retriever
    limits = Limits(max_seconds=settings.max_video_seconds, max_pixels=settings.max_pixels,
                    max_frames=settings.max_video_frames)
    try:
        times, inputs = await decoded(service, retriever.decode_video, data, limits=limits)
    except VideoLimitError as err:
        raise ServiceError(413, err.code, str(err)) from None
    except VideoDecodeError as err:
        raise ServiceError(400, "bad_video", str(err)) from None

    def answer():
        vectors = retriever.embed_uint8(inputs)
        return search_clip_embeddings(
            lambda v, n: retriever.search_embeddings(v, min(n, max(1, retriever.count))),
            times, vectors, k)
    matches = await run_solo(service, answer)
    return {"results": [match.as_dict() for match in matches]}
