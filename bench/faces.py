"""Faces per second: detection + 5-point alignment, and embedding, beside dlib's own pipeline.

    python -m bench.faces --folder ../shared/data/yalefaces [--repeats 5] [--markdown FILE]

Both sides work on the same photos (every image in the sub-folders of `--folder`, a
class-per-folder set, decoded once, untimed):

- alignment: the package's `align_faces` (the largest face, else the whole image, cut to
  dlib's 150x150 chip) against the same dlib calls made directly (frontal face detector,
  5-point shape predictor, `get_face_chip`) with no fallback;
- embedding of the aligned chips: the package's Embedder (the face ResNet in Flax, from the
  face-recognition-models file, compiled by XLA, on one XLA CPU device per core) against
  dlib's `compute_face_descriptor` on the whole batch of chips.

The two sides alternate `--repeats` times after one untimed round (which also compiles);
the table gives medians of faces/s and their ratio (package / dlib).
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np

from bench.report import emit


def read_photos(folder):
    from jaxretrieval.data.faces import as_rgb
    from jaxretrieval.data.images import read_image_file

    # A class-per-folder layout: the photos are in the sub-folders.
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   if root != folder for name in names if not name.startswith("."))
    return [as_rgb(read_image_file(path)) for path in paths]


def dlib_align(photos):
    import dlib

    from jaxretrieval.data.faces import CHIP_PADDING, CHIP_SIZE, face_models, largest

    detector, predictor = face_models()
    chips = []
    for photo in photos:
        box = largest(detector(photo, 0))
        if box is not None:
            chips.append(dlib.get_face_chip(photo, predictor(photo, box), size=CHIP_SIZE,
                                            padding=CHIP_PADDING))
    return chips


def package_embedder(batch_size):
    import jax

    from jaxretrieval.config import load_config_file
    from jaxretrieval.embed import Embedder
    from jaxretrieval.models import build_model
    from jaxretrieval.models.pretrained import configured_for_init, initial_variables

    config = configured_for_init(load_config_file(os.path.join("configs", "faces.py")))
    config.embed_batch_size = batch_size
    shape = (1, config.image_size, config.image_size, config.channels)
    fresh = build_model(config).init(jax.random.PRNGKey(0), np.zeros(shape, np.float32))
    return Embedder(config, initial_variables(config, fresh), checkpoint_step=0)


def median_rate(count, seconds):
    return count / statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="photos of faces (any layout)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()

    from jaxretrieval import runtime

    runtime.setup(batch_size=64)
    import dlib
    import jax

    from jaxretrieval.data.faces import FACE_RESNET_FILE, align_faces, face_model_file

    photos = read_photos(args.folder)
    embedder = package_embedder(batch_size=64)
    descriptor = dlib.face_recognition_model_v1(face_model_file(FACE_RESNET_FILE))
    chips, _ = align_faces(photos)
    chip_list = [np.ascontiguousarray(chip) for chip in chips]

    sides = {
        "align: package": lambda: align_faces(photos),
        "align: dlib": lambda: dlib_align(photos),
        "embed: package": lambda: embedder.embed_uint8(chips),
        "embed: dlib": lambda: descriptor.compute_face_descriptor(chip_list),
    }
    seconds = {name: [] for name in sides}
    for round_ in range(args.repeats + 1):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            if round_:  # the first round warms up and compiles
                seconds[name].append(time.perf_counter() - start)

    rates = {name: median_rate(len(photos), times) for name, times in seconds.items()}
    lines = [
        f"Faces per second on {len(photos)} photos of {args.folder} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{len(jax.devices())} XLA CPU devices, dlib {dlib.__version__}, "
        f"{datetime.date.today()}, medians of {args.repeats}): "
        f"`python -m bench.faces --folder {args.folder} --repeats {args.repeats}`",
        "",
        "| step | package faces/s | dlib faces/s | package / dlib |",
        "|---|---|---|---|",
    ]
    for step in ("align", "embed"):
        ours, theirs = rates[f"{step}: package"], rates[f"{step}: dlib"]
        lines.append(f"| {step} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
