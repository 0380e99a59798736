"""What runs inside the Ray cluster for `serve --ray`: the index shards' read replicas and
writers, and the embedder. `backend` deploys them and talks to them.

- `ShardReplica` (a Serve deployment per shard, R replicas): a `LogFollower` over the
  shard's folder, which polls the writer's log every `poll_s` and, asked for a position
  it has not reached, reads the log at once before answering.
- `ShardWriter` (a Ray actor per shard, restarted when it dies): the shard opened
  writable, so each change is in the log, fsynced, before the call returns.
- `EmbedderReplica` (a Serve deployment): the model, batching single images from every
  caller with Ray Serve's own batching.

This module imports the index only; the embedder's replicas import the model (JAX) as
they start, so that shard replicas stay small.
"""

import logging
import os
import threading
import time

import numpy as np
from ray import serve

from jaxretrieval.index.flat import Index
from jaxretrieval.index.follower import LogFollower, writer_position

logger = logging.getLogger(__name__)

# Searches one shard replica runs at once (Serve's default of 5 leaves cores idle while
# requests wait on the network).
MAX_ONGOING_SEARCHES = 32


def replica_identity() -> dict:
    """Which replica and process answered: for status pages and tests."""
    context = serve.get_replica_context()
    return {"replica": context.replica_id.unique_id, "pid": os.getpid()}


@serve.deployment(max_ongoing_requests=MAX_ONGOING_SEARCHES)
class ShardReplica:
    """One read replica of one shard (or of a flat index)."""

    def __init__(self, directory: str, poll_s: float):
        self._follower = LogFollower(directory)
        # A daemon thread: it follows the log for as long as the replica's process lives.
        threading.Thread(target=self._poll, args=(poll_s,), daemon=True,
                         name="log-follower").start()

    def _poll(self, poll_s):
        while True:
            time.sleep(poll_s)
            try:
                self._follower.follow()
            except Exception:  # a snapshot switch mid-read; the next poll starts again
                logger.exception("following the index log failed; trying again")

    def _index(self, wanted):
        self._follower.follow_to(wanted)
        return self._follower.index

    def search(self, queries, k, threshold, wanted, filter=None):
        """(keys, scores, metadata, count) as `Index.search` with metadata, once the log is
        read up to `wanted`."""
        index = self._index(wanted)
        keys, scores, metadata = index.search(queries, k, threshold=threshold, filter=filter,
                                              with_metadata=True)
        return keys, scores, metadata, index.count

    def metadata_of(self, key, wanted):
        return self._index(wanted).metadata_of(key)

    def contains(self, keys, wanted) -> list:
        index = self._index(wanted)
        return [key in index for key in keys]

    def source_of(self, key, wanted):
        return self._index(wanted).source_of(key)

    def describe(self) -> dict:
        """The manifest, count and log position this replica shows, and who it is."""
        index = self._follower.index
        return {**replica_identity(), "manifest": index.manifest, "count": index.count,
                "position": self._follower.position}


class ShardWriter:
    """The one writer of one shard's folder (wrapped with `ray.remote` by rayserve.backend).

    Each call returns (position, count): the log position that shows the change, and the
    shard's item count after it.
    """

    def __init__(self, directory: str, damaged_logs: str, expected: dict):
        self._directory = directory
        self._index = Index.load(directory, writable=True, expected=expected,
                                 damaged_logs=damaged_logs)

    def state(self):
        return writer_position(self._directory), self._index.count

    def pid(self) -> int:
        return os.getpid()

    def upsert(self, keys, embeddings, sources, metadata=None):
        self._index.upsert(keys, embeddings, sources, metadata)
        return self.state()

    def delete(self, keys):
        self._index.delete(keys)
        return self.state()

    def snapshot(self):
        self._index.snapshot()
        return self.state()

    def close(self):
        self._index.close()


@serve.deployment(max_ongoing_requests=256)
class EmbedderReplica:
    """The model of a workdir, embedding images one request each, in batches."""

    def __init__(self, workdir: str, max_batch: int, max_wait_s: float):
        from jaxretrieval.embed import Embedder  # JAX: only in the embedder's processes

        self._embedder = Embedder.from_workdir(workdir)
        self._embedder.warm_up(max_batch)
        self.embed.set_max_batch_size(max_batch)
        self.embed.set_batch_wait_timeout_s(max_wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def embed(self, images: list) -> list:
        """One uint8 model input per call, float32 [d] back; Serve gathers the calls."""
        return list(self._embedder.embed_uint8(np.stack(images)))

    def describe(self) -> dict:
        embedder = self._embedder
        return {**replica_identity(), "checkpoint_step": embedder.checkpoint_step,
                "model_config_hash": embedder.model_config_hash,
                "embedding_dim": embedder.embedding_dim}


@serve.deployment(max_ongoing_requests=4)
class Gallery:
    """The application's root: it binds the embedder and the shards, so that one
    `serve.run` starts them all at once; the ingress reaches each by name."""

    def __init__(self, embedder, *shards):
        """Takes the deployments only so that they are bound, and started, with the app."""

