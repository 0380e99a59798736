"""The service over Ray Serve: `start_ray_backend(workdir, ...)` gives a Retriever whose
embedder and index are Ray deployments, for the same app (`create_app`) to serve.

What runs where (see docs/ray.md):

- the ingress (this process: `serve --ray`) serves HTTP, decodes uploads and fans each
  search out to one replica of every shard, merging as the in-process sharded index does
  (`merge_results`); an add or delete goes to the writer of the shard that owns each key
  (`shard_of`), and is acknowledged once that writer has logged it durably;
- each shard is a Serve deployment of `replicas` read replicas that follow the shard's
  log (`LogFollower`), plus one writer actor that Ray restarts if its process dies;
- the embedder is a Serve deployment of `embedder_replicas` replicas, one GPU each where
  the cluster has GPUs, batching images with `@serve.batch`.

The index directory must be on storage that every node sees at the same path.

A search names, per shard, the log position of the last change this ingress acknowledged,
and a replica behind it reads the log before answering: an acknowledged change is in every
later answer. A replica or writer that is unreachable (its process died and Ray is
starting another) is asked again a few times; then the request is answered 503, asking
the client to retry.
"""

import copy
import math
import os
import threading
import time

import numpy as np
import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from jaxretrieval.config import model_config_hash
from jaxretrieval.data.images import InputSpec, load_images
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import storage
from jaxretrieval.index.checks import checked_rows, checked_string_list
from jaxretrieval.index.follower import caught_up
from jaxretrieval.index.metadata import checked_filter, checked_metadata_list
from jaxretrieval.index.sharded import merge_results, shard_directories, shard_of
from jaxretrieval.retriever import Retriever
from jaxretrieval.service.errors import ServiceError
from jaxretrieval.rayserve.deployments import (EmbedderReplica, Gallery, ShardReplica,
                                                  ShardWriter)
from jaxretrieval.workdir import Workdir

APP_NAME = "jaxretrieval"
CALL_TIMEOUT_S = 60.0
# Tries of a call whose replica or writer is unreachable, and the pause before each retry
# (times the try's number, 7 s in all): Serve replaces a dead replica, and Ray restarts a
# dead writer, which reopens its shard, within seconds.
ATTEMPTS = 8
RETRY_PAUSE_S = 0.25
POLL_S = 0.05  # how often read replicas look for new log lines


class Unavailable(Exception):
    """A replica or writer could not be reached (retry may help)."""


def _answer(call):
    """The result of `call()` (a Ray call and its wait), with the task's own error raised
    as itself, and unreachable replicas or writers as Unavailable."""
    try:
        return call()
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, JaxRetrievalError):
            raise cause from None
        if isinstance(cause, (ray.exceptions.RayActorError, RayServeException)):
            raise Unavailable(f"{type(cause).__name__}: {cause}") from None
        raise
    except (ray.exceptions.RayError, RayServeException, TimeoutError) as err:
        raise Unavailable(f"{type(err).__name__}: {err}") from None


def _with_retries(call, what, attempts=ATTEMPTS):
    """`_answer(call)`, tried again while unreachable; ServiceError 503 in the end."""
    for attempt in range(1, attempts + 1):
        try:
            return _answer(call)
        except Unavailable as err:
            last = err
            if attempt < attempts:
                time.sleep(RETRY_PAUSE_S * attempt)
    raise ServiceError(503, "unavailable", f"{what} is unavailable ({last}); retry in a "
                       "moment")


class RemoteIndex:
    """The index of a workdir as Ray deployments: what a Retriever asks of its index."""

    def __init__(self, shards, writers, manifest, states, on_close):
        self._shards = shards  # one DeploymentHandle per shard
        self._writers = writers  # one actor handle per shard
        self._manifest = manifest
        self._lock = threading.Lock()
        self._positions = [position for position, _ in states]
        self._counts = [count for _, count in states]
        self._on_close = on_close

    @property
    def num_shards(self):
        return len(self._shards)

    @property
    def count(self):
        """Items, as the shards last answered (any search or change updates it)."""
        return sum(self._counts)

    @property
    def embedding_dim(self):
        return self._manifest["embedding_dim"]

    @property
    def manifest(self):
        return {**copy.deepcopy(self._manifest), "count": self.count}

    @property
    def writable(self):
        return True

    def positions(self):
        """Per shard, the log position of the last change acknowledged here."""
        return list(self._positions)

    def _note(self, number, position, count):
        with self._lock:
            if caught_up(position, self._positions[number]):
                self._positions[number], self._counts[number] = position, count

    def __contains__(self, key):
        if not isinstance(key, str):
            return False
        number = shard_of(key, self.num_shards)
        wanted = self._positions[number]
        return _with_retries(lambda: self._shards[number].contains.remote(
            [key], wanted).result(timeout_s=CALL_TIMEOUT_S)[0], f"index shard {number}")

    def source_of(self, key):
        number = shard_of(key, self.num_shards)
        wanted = self._positions[number]
        return _with_retries(lambda: self._shards[number].source_of.remote(
            key, wanted).result(timeout_s=CALL_TIMEOUT_S), f"index shard {number}")

    def metadata_of(self, key):
        number = shard_of(key, self.num_shards)
        wanted = self._positions[number]
        return _with_retries(lambda: self._shards[number].metadata_of.remote(
            key, wanted).result(timeout_s=CALL_TIMEOUT_S), f"index shard {number}")

    def search(self, queries, k, *, threshold=None, filter=None, with_metadata=False):
        """As `ShardedIndex.search`: every shard's best k, merged."""
        checked_filter(filter)  # here, so that a bad filter fails before any request
        wanted = self.positions()
        responses = [shard.search.remote(queries, k, threshold, position, filter)
                     for shard, position in zip(self._shards, wanted)]
        results = []
        for number, response in enumerate(responses):
            first = [response]  # the first try reuses the request already sent

            def call(number=number, first=first):
                sent = first.pop() if first else self._shards[number].search.remote(
                    queries, k, threshold, wanted[number], filter)
                return sent.result(timeout_s=CALL_TIMEOUT_S)

            keys, scores, metadata, count = _with_retries(call, f"index shard {number}")
            with self._lock:
                self._counts[number] = count
            results.append((keys, scores, metadata))
        keys, scores, metadata = merge_results(results, k)
        return (keys, scores, metadata) if with_metadata else (keys, scores)

    def upsert(self, keys, embeddings, sources=None, metadata=None):
        """As `ShardedIndex.upsert`: each shard's writer logs its part before this returns.
        Retried while a writer restarts, as an upsert may be repeated."""
        embeddings, keys, sources = checked_rows(embeddings, keys, sources,
                                                 self.embedding_dim)
        metadata = checked_metadata_list(metadata, len(keys))
        parts = self._routed(keys)

        def part(rows, values):
            return None if values is None else [values[row] for row in rows]

        def send(number, rows):
            return self._writers[number].upsert.remote(
                part(rows, keys), embeddings[rows], part(rows, sources), part(rows, metadata))

        sent = {number: send(number, rows) for number, rows in parts.items()}
        for number, rows in parts.items():
            first = [sent[number]]

            def call(number=number, rows=rows, first=first):
                ref = first.pop() if first else send(number, rows)
                return ray.get(ref, timeout=CALL_TIMEOUT_S)

            self._note(number, *_with_retries(call, f"the writer of index shard {number}"))

    def delete(self, keys):
        """As `ShardedIndex.delete`, per shard (the Retriever has checked the keys exist).
        Not retried: a delete that was logged before its writer died would then refuse."""
        keys = checked_string_list(keys, "keys")
        parts = self._routed(keys)
        sent = {number: self._writers[number].delete.remote([keys[row] for row in rows])
                for number, rows in parts.items()}
        for number, ref in sent.items():
            self._note(number, *_with_retries(lambda ref=ref: ray.get(
                ref, timeout=CALL_TIMEOUT_S), f"the writer of index shard {number}",
                attempts=1))

    def _routed(self, keys):
        parts = {}
        for row, key in enumerate(keys):
            parts.setdefault(shard_of(key, self.num_shards), []).append(row)
        return parts

    def close(self):
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class RemoteEmbedder:
    """The embedder deployment, as a Retriever asks for it: one request per image, which
    the replicas batch."""

    def __init__(self, config, handle):
        self.config = config
        self.embedding_dim = config.embedding_dim
        self.model_config_hash = model_config_hash(config)
        self._handle = handle

    def embed_uint8(self, images: np.ndarray) -> np.ndarray:
        responses = [self._handle.embed.remote(image) for image in images]
        vectors = []
        for image, response in zip(images, responses):
            first = [response]

            def call(image=image, first=first):
                sent = first.pop() if first else self._handle.embed.remote(image)
                return sent.result(timeout_s=CALL_TIMEOUT_S)

            vectors.append(_with_retries(call, "the embedder"))
        return np.stack(vectors) if vectors else np.zeros((0, self.embedding_dim), np.float32)

    def embed(self, images) -> np.ndarray:
        return self.embed_uint8(load_images(images, InputSpec.of(self.config)))

    def warm_up(self, max_batch=None) -> None:
        """The replicas compile as they start."""


class RayRetriever(Retriever):
    """A Retriever over Ray deployments: its calls wait on other processes."""

    in_process = False

    def explain_uint8(self, image_a, image_b, *, threshold=None, stage=None):
        # Explaining needs the model's feature maps and gradients, which live in the
        # embedder's processes; the front end holds no model.
        raise ServiceError(501, "not_implemented", "explanations are served by the "
                           "one-process service: run `serve` without --ray for /explain")


def _writer_actor(number, app_name, directory, damaged_logs, expected):
    actor = ray.remote(ShardWriter).options(
        name=f"{app_name}-writer-{number}", max_restarts=-1, max_task_retries=0,
        num_cpus=0, max_concurrency=1)
    return actor.remote(directory, damaged_logs, expected)


def start_ray_backend(workdir: str, *, replicas: int = 1, embedder_replicas: int = 1,
                      address: str | None = None, replica_cpus: float = 1.0,
                      embedder_cpus: float = 1.0, max_batch: int = 32,
                      max_wait_ms: float = 2.0, poll_s: float = POLL_S,
                      app_name: str = APP_NAME) -> RayRetriever:
    """Deploys a workdir's index and model on Ray Serve and returns the Retriever that
    reaches them (for `create_app`); its `close()` removes the deployments.

    Connects to the cluster at `address` ("auto": the one this machine joined with
    `ray start`), or to the one this process already joined, or starts a local one.
    `poll_s`: how often read replicas look for new log lines (a search that needs a line
    they have not read yet reads it at once, whatever this is).
    """
    for name, value in (("replicas", replicas), ("embedder replicas", embedder_replicas)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise JaxRetrievalError(f"the number of {name} must be a positive integer, "
                                    f"got {value!r}")
    workdir = os.path.abspath(workdir)
    run = Workdir(workdir)
    config = run.read_config()
    index_dir = os.path.abspath(run.index)
    if not os.path.isdir(index_dir):
        raise JaxRetrievalError(f"no index at {index_dir}: build one with "
                                "`python -m train --eval_only` first")
    directories = shard_directories(index_dir) or [index_dir]
    if not ray.is_initialized():
        # A local instance (no address) offers a CPU for every replica even where the
        # machine has fewer cores, so that trying `--replicas 2` on a laptop starts rather
        # than waits for ever for CPUs no node has.
        wanted = math.ceil(len(directories) * replicas * replica_cpus
                           + embedder_replicas * embedder_cpus)
        ray.init(address=address, log_to_driver=False, num_cpus=None if address else max(
            os.cpu_count() or 1, wanted))
    expected = {"embedding_dim": config.embedding_dim,
                "model_config_hash": model_config_hash(config)}
    damaged_logs = os.path.join(index_dir, storage.DAMAGED_LOGS_DIR)
    writers = [_writer_actor(number, app_name, directory, damaged_logs, expected)
               for number, directory in enumerate(directories)]

    def remove():
        for writer in writers:
            try:
                ray.get(writer.close.remote(), timeout=10)
            except Exception:  # it is going anyway
                pass
            try:
                ray.kill(writer, no_restart=True)
            except Exception:  # already dead: nothing to stop, and no reason to hide why
                pass
        try:
            serve.delete(app_name)
        except Exception:  # already gone with its cluster
            pass

    try:
        states = [_answer(lambda w=w: ray.get(w.state.remote(), timeout=300))
                  for w in writers]
        serve.start(proxy_location="Disabled")  # the ingress is ours, with its own limits
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        embedder = EmbedderReplica.options(
            name="embedder", num_replicas=embedder_replicas,
            ray_actor_options={"num_cpus": embedder_cpus, **({"num_gpus": 1} if gpus else {})}
        ).bind(workdir, max_batch, max_wait_ms / 1000)
        shards = [ShardReplica.options(
            name=f"shard-{number}", num_replicas=replicas,
            ray_actor_options={"num_cpus": replica_cpus}).bind(directory, poll_s)
            for number, directory in enumerate(directories)]
        serve.run(Gallery.options(ray_actor_options={"num_cpus": 0}).bind(embedder, *shards),
                  name=app_name, route_prefix=None)
        shard_handles = [serve.get_deployment_handle(f"shard-{number}", app_name)
                         for number in range(len(directories))]
        embedder_handle = serve.get_deployment_handle("embedder", app_name)
        model = embedder_handle.describe.remote().result(timeout_s=CALL_TIMEOUT_S)
        manifest = shard_handles[0].describe.remote().result(
            timeout_s=CALL_TIMEOUT_S)["manifest"]
        storage.check_expected(index_dir, manifest, {
            **expected, "checkpoint_step": model["checkpoint_step"]}, len(directories))
    except Unavailable as err:
        remove()
        raise JaxRetrievalError(f"could not start the index writers on Ray: {err}") from None
    except BaseException:
        remove()
        raise
    index = RemoteIndex(shard_handles, writers, manifest, states, on_close=remove)
    return RayRetriever(RemoteEmbedder(config, embedder_handle), index)
