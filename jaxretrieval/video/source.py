"""The `video:PATH` dataset: the sampled frames of a folder of videos (searched through its
sub-folders) or of the videos a list file names, one item per frame.

A frame's key is `relative/path.mp4@12.0` (its video's path relative to the folder, or to
the list file's folder, and its time in seconds), its source `/absolute/path.mp4@12.0`, and
its label the index of its video. Every video is decoded once to list its frames; a video
that cannot be decoded is skipped, its path and the reason logged and kept in the export's
`skipped_videos`, and the others are embedded. Frames are kept in memory as model inputs
up to FRAME_CACHE_BYTES; past that, a video is decoded again when its frames are embedded.
"""

import logging
import os

import numpy as np
from PIL import Image

from jaxretrieval.data.images import to_model_input
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index.keys import check_keys
from jaxretrieval.video.decode import (Sampling, VideoDecodeError, frame_key, is_video_path,
                                       sample_frames)

logger = logging.getLogger(__name__)

FRAME_CACHE_BYTES = 512 << 20


def sampling_of(config) -> Sampling:
    return Sampling(rate=float(config.video_rate),
                    scene_threshold=float(config.video_scene_threshold))


def list_videos(path: str) -> tuple[str, list]:
    """(root, [video paths relative to root]) of a folder of videos or a list file."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        found = []
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            found += [os.path.relpath(os.path.join(folder, f), path) for f in files
                      if not f.startswith(".") and is_video_path(f)]
        return path, sorted(found)
    if os.path.isfile(path):
        root = os.path.dirname(path)
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        videos = [os.path.relpath(os.path.join(root, line), root) for line in lines
                  if line and not line.startswith("#")]
        return root, videos
    raise JaxRetrievalError(f"video:{path} names neither a folder of videos nor a list file "
                            "(one video path a line, relative to the file's folder)")


class VideoFrames:
    """The frames of each video as model inputs, decoded once at listing and kept while
    they fit the cache; decoded again (one video at a time) past it."""

    def __init__(self, paths, sampling: Sampling, spec, cache_bytes: int = FRAME_CACHE_BYTES):
        self.paths, self.sampling, self.spec = paths, sampling, spec
        self.times, self.skipped, self._frames = [], [], {}
        kept = 0
        for path in paths:
            try:
                sampled = sample_frames(path, sampling, convert=self._input)
            except VideoDecodeError as err:
                logger.warning("skipping video %s: %s", path, err)
                self.skipped.append({"path": path, "reason": str(err)})
                self.times.append(None)
                continue
            inputs = np.stack([inputs for _, inputs in sampled])
            self.times.append([seconds for seconds, _ in sampled])
            if kept + inputs.nbytes <= cache_bytes:
                self._frames[len(self.times) - 1] = inputs
                kept += inputs.nbytes
        self._current = (None, None)  # the one re-decoded video kept past the cache

    def _input(self, image: Image.Image) -> np.ndarray:
        return to_model_input(image, self.spec)

    def frame(self, video: int, position: int) -> np.ndarray:
        frames = self._frames.get(video)
        if frames is None:
            if self._current[0] != video:
                sampled = sample_frames(self.paths[video], self.sampling, convert=self._input)
                self._current = (video, np.stack([inputs for _, inputs in sampled]))
            frames = self._current[1]
        return frames[position]


def load_video_dataset(argument: str, config, dataset_class, spec):
    """The frames of the videos `argument` names, as a `dataset_class` (ImageDataset)."""
    root, relative = list_videos(argument)
    if not relative:
        raise JaxRetrievalError(f"no videos found in {root!r} (looked for the extensions of "
                                "jaxretrieval.video.decode.VIDEO_EXTENSIONS)")
    sampling = sampling_of(config)
    frames = VideoFrames([os.path.join(root, r) for r in relative], sampling, spec)
    keys, sources, labels, locations, names = [], [], [], [], []
    for video, (name, times) in enumerate(zip(relative, frames.times)):
        names.append(name)
        for position, seconds in enumerate(times or ()):
            keys.append(frame_key(name, seconds))
            sources.append(frame_key(os.path.join(root, name), seconds))
            labels.append(video)
            locations.append((video, position))
    if frames.skipped:
        logger.warning("%d of %d videos skipped (cannot be decoded): %s", len(frames.skipped),
                       len(relative), ", ".join(s["path"] for s in frames.skipped))
    try:
        check_keys(keys)
    except JaxRetrievalError as err:
        raise JaxRetrievalError(f"{err}. A video frame's key is the video's path relative to "
                                f"{root!r} and its time: rename that file or folder") from None
    dataset = dataset_class(
        f"video:{root}", np.asarray(labels, np.int64), keys, sources, names,
        config.image_size, config.channels, lambda i: frames.frame(*locations[i]),
        source_roots=(root,))
    dataset.export_metadata = {"video": sampling.as_dict(),
                               "skipped_videos": frames.skipped}
    return dataset
