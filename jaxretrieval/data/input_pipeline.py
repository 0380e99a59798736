"""The training batches of a run, from one of two input pipelines (`config.input_pipeline`).

- `in_process` (the default): the training process decodes each batch's images itself, with
  Pillow, when the step asks for it, and keeps them decoded in memory when the whole dataset
  fits `config.cache_max_bytes`. Best for datasets that fit in memory.
- `grain`: Grain worker processes (`config.input_workers`) read the encoded files or TFDS
  records, decode them (JPEGs with libjpeg-turbo at a reduced DCT scale,
  `data.fast_decode`) and resize them to the working size ahead of the step, and a thread
  puts each batch on the devices before the step needs it. For datasets too large to keep
  decoded, and for accelerators that a single decoding process cannot keep fed.

Both read the rows that `splits.BatchPlan.rows(step)` names, this process's share of them,
so a batch is a function of (seed, step) whichever pipeline reads it: a run resumes at any
step, and each process of a multi-process run reads only its own rows. Crop, flip and colour
jitter are not done here: they run on the device inside the compiled step
(`data.augment`).
"""

import functools
import logging
import os

import numpy as np

from jaxretrieval.data.fast_decode import decode_model_input, fast_jpeg_available
from jaxretrieval.data.images import InputSpec
from jaxretrieval.errors import JaxRetrievalError

logger = logging.getLogger(__name__)

INPUT_PIPELINES = ("in_process", "grain")
TFDS_REF_PREFIX = "tfds:"
# Host batches each worker keeps ready, and batches kept on the devices ahead of the step.
WORKER_BUFFER = 2
DEVICE_BUFFER = 2


def check_input_config(config) -> None:
    """Raises JaxRetrievalError for input-pipeline keys that cannot run."""
    if config.input_pipeline not in INPUT_PIPELINES:
        raise JaxRetrievalError(
            f"bad config: input_pipeline={config.input_pipeline!r}; use one of "
            f"{', '.join(INPUT_PIPELINES)}")
    workers = config.input_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise JaxRetrievalError(
            f"bad config: input_workers={workers!r}; use -1 (one per host core), 0 (decode "
            "in the training process) or a number of worker processes")
    if config.input_pipeline == "grain" and config.model.align_faces:
        raise JaxRetrievalError(
            "bad config: input_pipeline=grain decodes whole images, and model.align_faces "
            "trains on face chips cut once in memory; use input_pipeline=in_process")
    if config.input_pipeline == "grain" and str(config.dataset).startswith("video:"):
        raise JaxRetrievalError(
            "bad config: input_pipeline=grain reads image files, and a video:PATH dataset's "
            "items are frames decoded from videos; use input_pipeline=in_process")


def worker_count(config) -> int:
    """The number of decoding processes: `input_workers`, or with -1 one per core this
    process may run on, less one for the training process itself."""
    if config.input_workers >= 0:
        return config.input_workers
    return max(1, len(os.sched_getaffinity(0)) - 1)


class EncodedImages:
    """Reads an item's encoded image (file bytes, or a TFDS record's image bytes) from its
    source reference (`sources.ImageDataset.sources`). Plain data, so Grain can send it to
    its worker processes; each opens its own TFDS sources."""

    def __init__(self, sources, data_dir: str | None):
        self.sources = list(sources)
        self.data_dir = data_dir or None

    def __call__(self, index: int) -> bytes:
        reference = self.sources[index]
        if reference.startswith(TFDS_REF_PREFIX):
            name, split, record = reference[len(TFDS_REF_PREFIX):].rsplit("/", 2)
            return bytes(self._tfds(name, split)[int(record)]["image"])
        try:
            with open(reference, "rb") as f:
                return f.read()
        except OSError as err:
            raise JaxRetrievalError(
                f"cannot read image {reference!r} ({err.strerror}); replace or remove the "
                "file") from None

    @functools.lru_cache(maxsize=8)
    def _tfds(self, name, split):
        import tensorflow_datasets as tfds

        # The image feature's encoded bytes: decoded here, not by TFDS.
        return tfds.data_source(name, split=split, data_dir=self.data_dir, download=False,
                                decoders={"image": tfds.decode.SkipDecoding()})

    def __getstate__(self):
        return {"sources": self.sources, "data_dir": self.data_dir}

    def __setstate__(self, state):
        self.__init__(state["sources"], state["data_dir"])


class StepBatch:
    """step -> this process's share of the global batch of `step`, decoded: a Grain map
    transform (callable, plain data)."""

    def __init__(self, plan, share: slice, labels: np.ndarray, encoded: EncodedImages,
                 spec: InputSpec, reduced_dct: bool):
        self.plan, self.share, self.labels = plan, share, labels
        self.encoded, self.spec, self.reduced_dct = encoded, spec, reduced_dct

    def __call__(self, step: int) -> dict:
        rows = self.plan.rows(int(step))[self.share]
        size, channels = self.spec.image_size, self.spec.channels
        images = np.empty((len(rows), size, size, channels), np.uint8)
        for i, row in enumerate(rows):
            images[i] = decode_model_input(self.encoded(int(row)), self.spec,
                                           name=self.encoded.sources[row],
                                           reduced_dct=self.reduced_dct)
        return {"images": images, "labels": self.labels[rows].astype(np.int32)}


def grain_host_batches(config, dataset, plan, share: slice, start_step: int, stop_step: int,
                       *, workers: int | None = None):
    """A Grain IterDataset of the host batches of steps start_step .. stop_step - 1, in
    order, decoded by `workers` processes (default: `worker_count(config)`; 0: in this
    process, one batch ahead in a thread)."""
    import grain
    from absl import flags

    from jaxretrieval.data.sources import decoded_input_spec

    if not fast_jpeg_available():
        logger.warning("simplejpeg is not installed: the grain pipeline decodes JPEGs with "
                       "Pillow (`pip install simplejpeg` for libjpeg-turbo's reduced DCT)")
    workers = worker_count(config) if workers is None else workers
    if not flags.FLAGS.is_parsed():
        # Grain reads its settings from absl flags, which a program that is not an absl app
        # never parses: their defaults are what it gets.
        flags.FLAGS.mark_as_parsed()
    transform = StepBatch(plan, share, dataset.labels,
                          EncodedImages(dataset.sources, config.data_dir),
                          decoded_input_spec(config), config.input_reduced_dct)
    steps = grain.MapDataset.range(start_step, stop_step).map(transform)
    if workers == 0:
        return steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    # Inside a worker a batch is decoded in one go; the workers are the parallelism.
    return steps.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
                                 ).mp_prefetch(grain.MultiprocessingOptions(
                                     num_workers=workers, per_worker_buffer_size=WORKER_BUFFER))


class TrainingBatches:
    """The device batches of steps start_step .. stop_step - 1, in order (an iterator);
    `close()` stops any worker processes."""

    def __init__(self, config, dataset, plan, share: slice, start_step: int, stop_step: int,
                 devices):
        from jaxretrieval import parallel

        self._put = functools.partial(parallel.shard_batch, devices=devices)
        self._iterator = None
        if config.input_pipeline == "grain" and start_step < stop_step:
            import grain

            host = grain_host_batches(config, dataset, plan, share, start_step, stop_step)
            # Grain's own recipe for device prefetch, with this run's sharding of a batch.
            on_device = grain.experimental.ThreadPrefetchIterDataset(
                host.map(self._put), prefetch_buffer_size=DEVICE_BUFFER)
            self._iterator = iter(on_device)
            logger.info("input: grain, %d decoding worker(s)", worker_count(config))
        else:
            self._steps = iter(range(start_step, stop_step))
            self._dataset, self._plan, self._share = dataset, plan, share

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is not None:
            return next(self._iterator)
        rows = self._plan.rows(next(self._steps))[self._share]
        return self._put({"images": self._dataset.images(rows),
                          "labels": self._dataset.labels[rows].astype(np.int32)})

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
