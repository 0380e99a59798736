"""Reading videos with PyAV (FFmpeg's libraries): frames sampled at a rate and at scene
changes, each with its presentation time in seconds; frame keys `relative/path.mp4@12.0`.

A frame sampled at time T is the frame on screen at T: the last decoded frame whose
presentation time is at most T. Its key carries that frame's own presentation time (rounded
to milliseconds), so a key names exactly the picture it was embedded from.
"""

import dataclasses
import io
import math
import os

import numpy as np
from PIL import Image

from jaxretrieval.errors import JaxRetrievalError

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg",
                              ".mpeg", ".ts", ".flv", ".wmv", ".ogv", ".3gp", ".gif"})
DEFAULT_RATE = 1.0  # frames per second
# The side of the greyscale miniature two consecutive frames are compared at for scene
# changes: small enough to ignore noise and compression, large enough to see a cut.
SCENE_SIDE = 16
KEY_SEPARATOR = "@"
# Frame times closer than this are the same time (timestamps are fractions of a second).
EPSILON = 1e-6
# The container formats a video is opened as. FFmpeg otherwise probes every demuxer it
# has, among them playlists (concat, HLS, image sequences) that open further files named
# inside the data: an upload could make the service read local files.
FORMAT_WHITELIST = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,asf,ogg,gif,"
                    "h264,hevc,m4v")
# Decoding threads a video gets: one decode does not take every core of a shared service.
DECODE_THREADS = 2
# Frames decoded per allowed second before a video is refused as too long: bounds the work
# of a stream whose timestamps claim a short length over very many frames.
MAX_DECODED_RATE = 120


class VideoDecodeError(JaxRetrievalError):
    """A video that cannot be opened or decoded, or breaks a limit."""


class VideoLimitError(VideoDecodeError):
    """A video longer, larger or with more sampled frames than its `Limits` allow; `code`
    says which: `too_long` (seconds, frames) or `too_large` (pixels a frame)."""

    def __init__(self, message: str, code: str = "too_long"):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Which frames of a video are taken: one every 1/rate seconds (rate 0: none), and with
    `scene_threshold` > 0 every frame whose miniature differs from the previous frame's by
    more than this mean absolute difference (0..1 of the pixel range)."""

    rate: float = DEFAULT_RATE
    scene_threshold: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise JaxRetrievalError(f"the sampling rate must be a number >= 0, got {self.rate!r}")
        if not (math.isfinite(self.scene_threshold) and 0 <= self.scene_threshold < 1):
            raise JaxRetrievalError("the scene-change threshold must lie in [0, 1) (0: off), "
                                    f"got {self.scene_threshold!r}")
        if self.rate == 0 and self.scene_threshold == 0:
            raise JaxRetrievalError("sample at a rate > 0, at scene changes "
                                    "(scene_threshold > 0), or both")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a video may hold before it is refused (a service's uploads): its length from
    its first frame, every frame's pixels, the frames sampled, and (`max_decoded`) the
    frames decoded."""

    max_seconds: float = math.inf
    max_pixels: int = 40_000_000  # per frame
    max_frames: int = 100_000  # frames sampled

    @property
    def max_decoded(self) -> float:
        """Frames decoded at most (sampled or not): MAX_DECODED_RATE a second allowed."""
        return math.ceil(self.max_seconds * MAX_DECODED_RATE) \
            if math.isfinite(self.max_seconds) else math.inf


def time_text(seconds: float) -> str:
    """A frame time as keys show it: milliseconds at most, and always a decimal point."""
    return repr(round(float(seconds), 3) + 0.0)


def frame_key(video_key: str, seconds: float) -> str:
    return f"{video_key}{KEY_SEPARATOR}{time_text(seconds)}"


def parse_frame_key(key: str):
    """(video key, seconds) of a frame key, or None for a key that names no video frame."""
    video, separator, seconds = key.rpartition(KEY_SEPARATOR)
    if not separator or not video:
        return None
    try:
        value = float(seconds)
    except ValueError:
        return None
    return (video, value) if math.isfinite(value) and value >= 0 else None


def is_video_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def pyav():
    """The `av` module (PyAV), or one clear error saying how to install it."""
    try:
        import av
    except ImportError:
        raise JaxRetrievalError("videos need PyAV: pip install 'jaxretrieval[video]' (or "
                                "pip install av)") from None
    return av


def open_video(source):
    """A PyAV container of a video file path or bytes, read only as one of FORMAT_WHITELIST's
    formats and opening no other file or URL (a path: the file itself alone)."""
    av = pyav()
    options = {"format_whitelist": FORMAT_WHITELIST,
               # "none" names no protocol: bytes open nothing else; a path only files.
               "protocol_whitelist": "none" if isinstance(source, bytes) else "file"}
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else source,
                   container_options=options)


def sample_frames(source, sampling: Sampling = Sampling(), *, limits: Limits = Limits(),
                  keep_images: bool = True, convert=None):
    """[(seconds, HxWx3 uint8 frame or None)] of a video file path or bytes, in time order.

    `keep_images=False` lists the times alone (the frames are still decoded, since scene
    changes are found in the pixels); `convert(PIL image)` replaces each kept frame by what
    it returns as the frame is sampled. Raises VideoDecodeError naming the video for one
    that cannot be opened or decoded, has no video stream, yields no sampled frame, or
    breaks `limits`.
    """
    name = source if isinstance(source, str) else "the uploaded video"
    try:
        container = open_video(source)
    except JaxRetrievalError:
        raise
    except Exception as err:  # FFmpeg raises many types for files it cannot read
        raise VideoDecodeError(f"cannot open {name} as a video in a supported format "
                               f"({FORMAT_WHITELIST}): {err}") from None
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{name} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = DECODE_THREADS
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_pixels:
            raise VideoLimitError(f"{name} has frames of {width}x{height} pixels; at most "
                                  f"{limits.max_pixels} pixels per frame are allowed",
                                  "too_large")
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > limits.max_seconds:
            raise VideoLimitError(f"{name} lasts {declared:.1f} s; at most "
                                  f"{limits.max_seconds:g} s are allowed")
        try:
            return _sample(container, stream, sampling, limits, keep_images, name, convert)
        except VideoDecodeError:
            raise
        except Exception as err:
            raise VideoDecodeError(f"cannot decode {name} ({err})") from None


def _declared_seconds(container, stream):
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # FFmpeg's AV_TIME_BASE
    return None


def _sample(container, stream, sampling, limits, keep_images, name, convert):
    frames = []
    rate = sampling.rate

    def due_time(n):  # the time of the n-th rate sample, as a product: no drift from sums
        return n / rate if rate > 0 else (0.0 if n == 0 else math.inf)

    due = 0  # the next rate sample's number
    last = previous = None  # last: (seconds, frame) on screen before this one
    count = 0
    first = origin = None
    for frame in container.decode(stream):
        seconds = frame.time
        if seconds is None:  # no timestamps: count frames at the stream's rate
            seconds = count / float(stream.average_rate or 25)
        count += 1
        if first is None:
            first, origin = seconds, start_of(seconds)
        seconds -= origin
        if frame.width * frame.height > limits.max_pixels:  # the size may change midway
            raise VideoLimitError(f"{name} has frames of {frame.width}x{frame.height} pixels; "
                                  f"at most {limits.max_pixels} pixels per frame are allowed",
                                  "too_large")
        if seconds + origin - first > limits.max_seconds:  # the length from the first frame
            raise VideoLimitError(f"{name} lasts more than {limits.max_seconds:g} s")
        if count > limits.max_decoded:
            raise VideoLimitError(f"{name} has more than {limits.max_decoded} frames in "
                                  f"{limits.max_seconds:g} s")
        # Rate samples due before this frame show the last one (the first frame stands
        # for the times before it); a gap of many steps is one jump, not a loop.
        if due_time(due) < seconds - EPSILON:
            _take(frames, last or (seconds, frame), keep_images, convert)
            due = max(due + 1, math.ceil((seconds - EPSILON) * rate))
        if abs(seconds - due_time(due)) <= EPSILON:
            _take(frames, (seconds, frame), keep_images, convert)
            due += 1
        if sampling.scene_threshold > 0:
            miniature = frame.reformat(width=SCENE_SIDE, height=SCENE_SIDE,
                                       format="gray").to_ndarray().astype(np.float32) / 255.0
            if previous is not None and float(np.abs(miniature - previous).mean()) \
                    > sampling.scene_threshold:
                _take(frames, (seconds, frame), keep_images, convert)
            previous = miniature
        last = (seconds, frame)
        if len(frames) > limits.max_frames:
            raise VideoLimitError(f"{name} gives more than {limits.max_frames} frames")
    if count == 0:
        raise VideoDecodeError(f"{name} holds no decodable frame")
    if not frames:
        raise VideoDecodeError(f"{name} gives no frame at the sampled times")
    return frames


def start_of(first_seconds: float) -> float:
    """The time frame times count from: 0, or the first frame's time when it is negative
    (keys hold no negative time; a video starting late keeps its presentation times)."""
    return min(0.0, first_seconds)


def _take(frames, entry, keep_images, convert):
    seconds, frame = entry
    if frames and round(frames[-1][0], 3) == round(seconds, 3):
        return  # the same frame, due both as a rate sample and a scene change
    if not keep_images:
        image = None
    elif convert is not None:  # one model input kept a frame, not the full-size picture
        image = convert(frame.to_image())
    else:
        image = frame.to_ndarray(format="rgb24")
    frames.append((seconds, image))


def read_frame_at(path: str, seconds: float) -> Image.Image:
    """The frame of a video file on screen at `seconds` (a frame key's time), as RGB."""
    try:
        with open_video(path) as container:
            stream = container.streams.video[0]
            first = next(iter(container.decode(stream)), None)
            # The first frame's time sets where keys count from, as in sample_frames.
            origin = start_of(first.time or 0.0) if first is not None else 0.0
            seconds += origin
            if stream.time_base is not None:  # back to the keyframe before, from the start
                container.seek(int(max(origin, seconds - 1.0) / stream.time_base),
                               stream=stream, backward=True)
            shown = None
            for frame in container.decode(stream):
                if frame.time is not None and frame.time > seconds + 5e-4:
                    break
                shown = frame
    except Exception as err:
        raise VideoDecodeError(f"cannot read {path!r} at {seconds} s ({err})") from None
    if shown is None:
        raise VideoDecodeError(f"{path!r} has no frame at {seconds} s")
    return shown.to_image()
