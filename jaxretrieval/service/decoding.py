"""Bounded pools of threads for work that takes a core or more per request: decoding
uploads, and running the model outside the shared batcher (explanations, video clips).

Decoding a large image takes a core for a fraction of a second, and an explanation or a
clip's frames run the whole model. In the event loop's default thread pool (dozens of
threads) a few such requests take every core, and the loop, which answers every other
request, waits for CPU; here at most `threads` jobs run at once, and at most `max_waiting`
more wait, beyond which `run` refuses at once (PoolFull) instead of letting the backlog
grow.
"""

import asyncio
import concurrent.futures
import functools


class PoolFull(Exception):
    """Every thread of the pool is busy and the waiting line is full: a transient overload."""


class BoundedPool:
    def __init__(self, threads: int, max_waiting: int, name: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=name)
        self._capacity = threads + max_waiting
        self._pending = 0  # only touched from the event loop's thread

    async def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` in one of the pool's threads; raises PoolFull when
        saturated."""
        if self._pending >= self._capacity:
            raise PoolFull()
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor,
                                              functools.partial(fn, *args, **kwargs))
        finally:
            self._pending -= 1

    def close(self):
        self._executor.shutdown(wait=False, cancel_futures=True)
