"""Micro-batching: concurrent image queries share one compiled embedding call."""

import concurrent.futures
import queue
import threading
import time

import numpy as np


class QueueFull(Exception):
    """The batcher's queue is at its limit: the caller should answer 503 and let clients retry."""


class MicroBatcher:
    """Gathers images from concurrent callers into batches for `embed_fn`.

    A worker thread takes the first waiting image, then keeps collecting until it has
    `max_batch` images or `max_wait_ms` have passed, and embeds them in one call. The queue
    holds at most `max_queue` images; beyond that `submit` raises QueueFull at once instead
    of letting latency and memory grow without limit.
    """

    def __init__(self, embed_fn, *, max_batch: int = 32, max_wait_ms: float = 2.0,
                 max_queue: int = 1024, on_batch=None):
        self._embed_fn = embed_fn  # uint8 [n, H, W, C] -> float32 [n, d]
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._queue = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch  # called with each batch's size (for metrics)
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._worker.start()

    def submit(self, images: np.ndarray) -> "concurrent.futures.Future":
        """Queues uint8 [n, H, W, C] images; the future gives their float32 [n, d] embeddings."""
        future = concurrent.futures.Future()
        if len(images) == 0:
            future.set_result(np.zeros((0, 0), np.float32))
            return future
        parts = [concurrent.futures.Future() for _ in range(len(images))]
        for image, part in zip(images, parts):
            try:
                self._queue.put_nowait((image, part))
            except queue.Full:
                for queued in parts:
                    queued.cancel()  # the worker skips cancelled items
                raise QueueFull() from None
        _gather(parts, future)
        return future

    def _run(self):
        while not self._stopped.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self._max_wait
            while len(batch) < self._max_batch:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=max(remaining, 0)) if remaining > 0
                                 else self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [(image, part) for image, part in batch if part.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                vectors = self._embed_fn(np.stack([image for image, _ in batch]))
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                for (_, part), vector in zip(batch, vectors):
                    part.set_result(vector)
            except BaseException as err:  # every waiting caller hears about the failure
                for _, part in batch:
                    part.set_exception(err)

    def close(self):
        self._stopped.set()
        self._worker.join(timeout=5)


def _gather(parts, future):
    """Completes `future` with the stacked results of `parts`, or the first failure."""
    remaining = [len(parts)]
    lock = threading.Lock()

    def done(_):
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        failures = [p for p in parts if p.cancelled() or p.exception() is not None]
        if failures:
            failure = failures[0]
            future.set_exception(failure.exception() if not failure.cancelled()
                                 else RuntimeError("embedding cancelled"))
        else:
            future.set_result(np.stack([p.result() for p in parts]))

    for part in parts:
        part.add_done_callback(done)
