"""The embedding export (`DIR/embeddings/`): a dataset's embeddings in chunks, written with
Orbax by every process of a run, resumable; the index is built from it.

Layout:

    export.json      count, embedding_dim, chunk_size, num_chunks, the model's identity
                     (checkpoint_step, model_config_hash), dataset, data_dir,
                     source_roots (where the sources lie: absolute folders or tfds:NAME;
                     absent from older exports), and match_thresholds once evaluation
                     has calibrated them; for videos, `video` (the frame sampling) and
                     `skipped_videos` (those that could not be decoded, and why)
    keys.json        str [count], the dataset's keys, in dataset order
    sources.json     str [count], where each image can be read again
    labels.json      int [count]
    chunks/000000/   Orbax: {"embeddings": float32 [chunk_size, dim]}; chunk c holds rows
                     c*chunk_size ... (the last one zero-padded past `count`)

Writing happens in `.NAME.partial/` beside the export. Each chunk is one array sharded
over every device of every process; each process embeds and writes its own rows, and Orbax
renames a chunk's folder into place only once all parts are written, so a finished chunk
is never redone when the same export is started again. When all chunks are there, the
folder is swapped in whole: `DIR/embeddings/` is always a complete export (or absent).
"""

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from jaxretrieval import parallel
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.fileio import recover_interrupted_swap, swap_in, write_json_atomically

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
DEFAULT_CHUNK_SIZE = 8192
EXPORT_FILE = "export.json"
CHUNKS_DIR = "chunks"
ARRAY_NAME = "embeddings"
# What must match for a partial export to be resumed rather than started again.
IDENTITY_KEYS = ("format", "count", "embedding_dim", "chunk_size", "checkpoint_step",
                 "model_config_hash", "dataset", "data_dir", "video")
REWRITE_HINT = ("write it again with `python -m train --eval_only --workdir DIR` or "
                "`jaxretrieval embed --workdir DIR`")


@dataclasses.dataclass
class EmbeddingExport:
    embeddings: np.ndarray  # float32 [n, d], row i = dataset item i
    labels: np.ndarray  # int64 [n]
    keys: list  # str [n]
    sources: list  # str [n]
    metadata: dict  # the contents of export.json


def partial_directory(directory: str) -> str:
    """Where an unfinished export of `directory` is written (and resumed from)."""
    parent, name = os.path.split(os.path.abspath(directory))
    return os.path.join(parent, f".{name}.partial")


def _chunk_path(directory: str, chunk: int) -> str:
    return os.path.join(directory, CHUNKS_DIR, f"{chunk:06d}")


def write_embedding_export(directory: str, embedder, dataset, *, metadata: dict | None = None,
                           chunk_size: int = DEFAULT_CHUNK_SIZE,
                           on_progress: Callable | None = None) -> dict:
    """Embeds every item of `dataset` with `embedder` into the export at `directory`.

    Every process of the run calls this with the same arguments: the chunks are split over
    all processes' devices. Returns the export's metadata. `on_progress` (process 0) gets
    {"done", "total", "images_per_sec"} after each chunk.
    """
    devices = parallel.global_devices()
    # Every process embeds an equal block of each chunk: a multiple of the device count.
    chunk_size = -(-max(1, chunk_size) // len(devices)) * len(devices)
    count = len(dataset)
    meta = dict(dataset.export_metadata, **(metadata or {}), format=FORMAT_VERSION, count=count,
                embedding_dim=embedder.embedding_dim, chunk_size=chunk_size,
                num_chunks=-(-count // chunk_size), checkpoint_step=embedder.checkpoint_step,
                model_config_hash=embedder.model_config_hash,
                source_roots=list(dataset.source_roots), complete=False)
    partial = partial_directory(directory)
    if parallel.is_primary_process():
        _start_or_resume(partial, meta, dataset)
    parallel.barrier("export-started")

    sharding = parallel.batch_sharding(devices)
    share = parallel.process_share(chunk_size)
    # The finished chunks as process 0 sees them, so that every process skips the same ones.
    todo = [c for c in range(meta["num_chunks"])
            if not os.path.isdir(_chunk_path(partial, c))]
    todo = _same_on_every_process(todo, meta["num_chunks"])
    logger.info("embedding %d items in %d chunks of %d (%d already done) on %d device(s)",
                count, meta["num_chunks"], chunk_size, meta["num_chunks"] - len(todo),
                len(devices))

    started, embedded = time.perf_counter(), 0
    with ocp.StandardCheckpointer() as checkpointer:
        for done, chunk in enumerate(todo, 1):
            first = chunk * chunk_size
            rows = np.arange(first + share.start, first + share.stop)
            rows = rows[rows < count]
            local = np.zeros((share.stop - share.start, embedder.embedding_dim), np.float32)
            if len(rows):
                local[:len(rows)] = embedder.embed_uint8(dataset.images(rows))
            array = jax.make_array_from_process_local_data(
                sharding, local, (chunk_size, embedder.embedding_dim))
            # Asynchronous: the next chunk is embedded while this one is written.
            checkpointer.save(_chunk_path(partial, chunk), {ARRAY_NAME: array})
            embedded += min(chunk_size, count - first)
            if on_progress is not None and parallel.is_primary_process():
                on_progress({"done": done, "total": len(todo),
                             "images_per_sec": embedded / (time.perf_counter() - started)})
        checkpointer.wait_until_finished()
    parallel.barrier("export-chunks-written")

    if parallel.is_primary_process():
        meta["complete"] = True
        write_json_atomically(os.path.join(partial, EXPORT_FILE), meta)
        swap_in(partial, directory)
    parallel.barrier("export-finished")
    return meta


def _start_or_resume(partial: str, meta: dict, dataset) -> None:
    """Keeps a partial export of the same model and dataset; anything else starts over."""
    existing = _read_json(os.path.join(partial, EXPORT_FILE))
    if existing is not None and all(existing.get(k) == meta.get(k) for k in IDENTITY_KEYS):
        logger.info("resuming the unfinished export in %s", partial)
        return
    if os.path.exists(partial):
        logger.info("discarding the unfinished export in %s (another model or dataset)", partial)
        shutil.rmtree(partial)
    os.makedirs(os.path.join(partial, CHUNKS_DIR))
    for name, value in (("keys.json", list(dataset.keys)), ("sources.json", list(dataset.sources)),
                        ("labels.json", [int(label) for label in dataset.labels])):
        write_json_atomically(os.path.join(partial, name), value)
    write_json_atomically(os.path.join(partial, EXPORT_FILE), meta)


def _same_on_every_process(chunks: list, num_chunks: int) -> list:
    if jax.process_count() == 1:
        return chunks
    from jax.experimental import multihost_utils
    mask = np.zeros(num_chunks, np.bool_)
    mask[chunks] = True
    mask = multihost_utils.broadcast_one_to_all(mask)
    return [int(c) for c in np.flatnonzero(mask)]


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def update_export_metadata(directory: str, **updates) -> None:
    """Adds entries to a finished export's export.json (e.g. match thresholds)."""
    path = os.path.join(directory, EXPORT_FILE)
    meta = _read_json(path)
    if meta is None:
        raise JaxRetrievalError(f"no embedding export in {directory!r}; {REWRITE_HINT}")
    write_json_atomically(path, dict(meta, **updates))


def load_embedding_export(directory: str) -> EmbeddingExport:
    """Reads a finished export into host memory (in this process alone)."""
    recover_interrupted_swap(directory)
    meta = _read_json(os.path.join(directory, EXPORT_FILE))
    if meta is None or not meta.get("complete"):
        raise JaxRetrievalError(f"no finished embedding export in {directory!r}; {REWRITE_HINT}")
    if meta.get("format") != FORMAT_VERSION:
        raise JaxRetrievalError(
            f"the embedding export in {directory!r} has format {meta.get('format')!r}, this "
            f"version reads {FORMAT_VERSION}; {REWRITE_HINT}")
    loaded = {name: _read_json(os.path.join(directory, f"{name}.json"))
              for name in ("keys", "sources", "labels")}
    count, dim, chunk_size = meta["count"], meta["embedding_dim"], meta["chunk_size"]
    # Checked before any chunk is read: a missing labels.json is this error, not a TypeError.
    if any(value is None or len(value) != count for value in loaded.values()):
        raise JaxRetrievalError(
            f"the embedding export in {directory!r} is inconsistent (its keys, sources or "
            f"labels do not hold {count} items); {REWRITE_HINT}")
    embeddings = np.empty((meta["num_chunks"] * chunk_size, dim), np.float32)
    target = {ARRAY_NAME: jax.ShapeDtypeStruct(
        (chunk_size, dim), np.float32, sharding=SingleDeviceSharding(jax.local_devices()[0]))}
    # Only this process reads: no barrier with the other processes of a run.
    solo = ocp.options.MultiprocessingOptions(primary_host=None,
                                              active_processes={jax.process_index()})
    with ocp.StandardCheckpointer(multiprocessing_options=solo) as checkpointer:
        for chunk in range(meta["num_chunks"]):
            path = _chunk_path(directory, chunk)
            if not os.path.isdir(path):
                raise JaxRetrievalError(
                    f"the embedding export in {directory!r} lacks chunk {chunk}; {REWRITE_HINT}")
            restored = checkpointer.restore(path, target)
            embeddings[chunk * chunk_size:(chunk + 1) * chunk_size] = np.asarray(
                restored[ARRAY_NAME])
    return EmbeddingExport(embeddings=embeddings[:count],
                           labels=np.asarray(loaded["labels"], np.int64),
                           keys=loaded["keys"], sources=loaded["sources"], metadata=meta)
