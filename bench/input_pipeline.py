"""Host input throughput: images/s per core from a folder of ImageNet-like JPEGs, for the
in-process loader and the grain pipeline side by side, and for the JPEG decoders alone.

    python -m bench.input_pipeline --images 2000 --workers 1 --repeats 5

The script writes the folder itself (about 500x375 photos-like pictures at quality 90, in
`--classes` class folders) unless `--folder` names one already written. Pipelines are timed
in alternation, repeat by repeat, after a warm-up batch (worker start-up is not counted), as
the median of `--repeats` windows; per core divides by the processes that decode (the
training process alone for in_process, the workers for grain). The last line is a JSON
object with every figure.
"""

import argparse
import io
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

PHOTO_SIZE = (500, 375)  # width, height: ImageNet's typical photo
QUALITY = 90


def photo_like(rng, width: int, height: int) -> np.ndarray:
    """A smooth picture of a few coloured shapes, with texture: compresses like a photo
    (about 50-80 KB at 500x375, quality 90), unlike noise or a flat colour."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(30, 200)
        weight = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
        image += weight * rng.uniform(0, 255, 3)
    image += (20 * np.sin(x / rng.uniform(3, 12))[..., None]
              * np.cos(y / rng.uniform(3, 12))[..., None])  # a fine texture
    image += rng.normal(0, 10, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_photo(name: str, seed: int, index: int) -> None:
    rng = np.random.default_rng([seed, index])  # one image's own stream: any process order
    width = int(PHOTO_SIZE[0] * rng.uniform(0.9, 1.1))
    height = int(PHOTO_SIZE[1] * rng.uniform(0.9, 1.1))
    Image.fromarray(photo_like(rng, width, height)).save(name, quality=QUALITY)


def _write_photos(job):
    for name, seed, index in job:
        write_photo(name, seed, index)


def write_jpeg_folder(root: str, images: int, classes: int, seed: int = 0,
                      processes: int = 1) -> str:
    """`images` JPEGs of about PHOTO_SIZE at QUALITY, spread over `classes` class folders,
    written by `processes` processes; returns `root`. Kept when already there."""
    names = [os.path.join(root, f"class{i % classes:03d}", f"{i:06d}.jpg") for i in range(images)]
    missing = [(name, seed, i) for i, name in enumerate(names) if not os.path.isfile(name)]
    for name, _, _ in missing:
        os.makedirs(os.path.dirname(name), exist_ok=True)
    if processes > 1 and len(missing) >= 64 * processes:  # else a pool costs more than it saves
        import multiprocessing

        jobs = [missing[i::processes] for i in range(processes)]
        # spawn: the caller may already run JAX's threads, which a fork would copy half-way
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.map(_write_photos, jobs)
    else:
        _write_photos(missing)
    return root


def decoder_times(files, size: int, repeats: int) -> dict:
    """Median ms per image of each decoder, from bytes in memory: decoding alone (Pillow,
    as the in-process loader decodes, and simplejpeg at full scale, at 1/2 scale, and at
    the 5/8 scale that the pipeline's choice of 1/2, 1/4 and 1/8 avoids), and to the
    model's input at `size` and at half of it (where the pipeline decodes ImageNet-sized
    photos at 1/2 scale)."""
    import simplejpeg

    from jaxretrieval.data.fast_decode import decode_model_input
    from jaxretrieval.data.images import InputSpec, to_model_input

    blobs = [open(f, "rb").read() for f in files]
    spec, half = InputSpec(size, 3), InputSpec(size // 2, 3)

    def scaled(blob, divisor):
        height, width = simplejpeg.decode_jpeg_header(blob)[:2]
        return simplejpeg.decode_jpeg(blob, min_height=-(-height // divisor),
                                      min_width=-(-width // divisor))

    cases = {
        "pil": read_bytes,  # Image.open + load + EXIF orientation, as the in-process loader
        "simplejpeg": lambda b: simplejpeg.decode_jpeg(b),
        "simplejpeg_1/2_scale": lambda b: scaled(b, 2),
        "simplejpeg_5/8_scale": lambda b: simplejpeg.decode_jpeg(b, min_height=size,
                                                                 min_width=size),
        f"in_process_to_{size}": lambda b: to_model_input(read_bytes(b), spec),
        f"grain_to_{size}": lambda b: decode_model_input(b, spec, name=""),
        f"in_process_to_{size // 2}": lambda b: to_model_input(read_bytes(b), half),
        f"grain_to_{size // 2}": lambda b: decode_model_input(b, half, name=""),
    }
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, decode in cases.items():  # alternated, so load changes hit all alike
            start = time.perf_counter()
            for blob in blobs:
                decode(blob)
            times[name].append((time.perf_counter() - start) / len(blobs) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def read_bytes(blob: bytes) -> Image.Image:
    """The in-process loader's decode (`images.read_image_file`), from bytes."""
    from jaxretrieval.data.images import upright

    image = Image.open(io.BytesIO(blob))
    image.load()
    return upright(image)


def pipeline_rates(folder: str, size: int, batch: int, batches: int, workers: int,
                   repeats: int) -> dict:
    """Median images/s of the in-process loader and of the grain pipeline (`workers`
    processes) over the same batches of the same run."""
    from jaxretrieval.config import base_config
    from jaxretrieval.data.input_pipeline import grain_host_batches
    from jaxretrieval.data.sources import load_dataset
    from jaxretrieval.data.splits import batch_plan, split_dataset

    config = base_config()
    config.dataset, config.image_size, config.channels = f"folder:{folder}", size, 3
    config.global_batch_size, config.cache_max_bytes = batch, 0  # decode every time
    dataset = load_dataset(config)
    plan = batch_plan(config, split_dataset(config, dataset), dataset.labels)
    rates = {"in_process": [], "grain": []}
    for repeat in range(repeats):
        first = 1 + repeat * (batches + 1)  # fresh rows each window: no page-cache favourite
        start = time.perf_counter()
        for step in range(first, first + batches):
            dataset.images(plan.rows(step))
        rates["in_process"].append(batch * batches / (time.perf_counter() - start))

        iterator = iter(grain_host_batches(config, dataset, plan, slice(None), first - 1,
                                           first + batches, workers=workers))
        try:
            next(iterator)  # the workers' start-up and first batch are not timed
            start = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            rates["grain"].append(batch * batches / (time.perf_counter() - start))
        finally:
            iterator.close()
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {"in_process_images_per_sec": medians["in_process"],
            "grain_images_per_sec": medians["grain"],
            "in_process_images_per_sec_per_core": medians["in_process"],
            "grain_images_per_sec_per_core": medians["grain"] / max(workers, 1),
            "grain_over_in_process": medians["grain"] / medians["in_process"],
            "grain_workers": workers}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="the JPEG folder (written there if missing); "
                                         "default: a temporary folder")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=224, help="the working size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed window")
    parser.add_argument("--workers", type=int, default=1, help="grain's decoding processes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decoder_images", type=int, default=200)
    args = parser.parse_args()
    folder = args.folder or os.path.join(tempfile.gettempdir(),
                                         f"jaxretrieval_jpegs_{args.images}_{args.classes}")
    start = time.perf_counter()
    write_jpeg_folder(folder, args.images, args.classes)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
              "images": len(files), "folder_seconds": time.perf_counter() - start,
              "mean_jpeg_bytes": float(np.mean([os.path.getsize(f) for f in files[:200]])),
              "size": args.size, "batch": args.batch}
    report["decoder_ms_per_image"] = decoder_times(files[:args.decoder_images], args.size,
                                                   args.repeats)
    print(json.dumps(report["decoder_ms_per_image"]), flush=True)
    report.update(pipeline_rates(folder, args.size, args.batch, args.batches, args.workers,
                                 args.repeats))
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
