"""The store as the event loop sees it: every call awaitable, and one place that decides, per backend,
what may run on the loop and what runs in a worker thread.

- diskcache (`kind == "disk"`): a read is one SELECT on a local SQLite database in WAL mode, where
  readers never wait for writers; it costs less than handing it to a thread (about 30 µs against 80 µs),
  so reads run on the loop. Writes are a transaction that may wait for another process's write lock:
  they run in worker threads.
- Redis (`kind == "redis"`), with or without a memory tier: every call is network I/O to a server that
  may be slow or hung, so every call runs in a worker thread; a hung Redis holds up the requests that
  need it (until redis-py's socket timeout), never the others.
- a memory store (tests, a cache that could not be opened): on the loop.

The worker threads are the store's own (`in_store_thread`), not the event loop's default executor: that
one resolves names (the egress policy's and mitmproxy's own connects), so a hung Redis holding its few
threads (5 or 6 on two cores) would stall every request to a named host, cached or not.

>>> import asyncio
>>> from forward_proxy.store.memory import MemoryStore
>>> store = AsyncStore(MemoryStore(), kind="memory")
>>> asyncio.run(store.get_many(["a", "b"]))
{'a': None, 'b': None}
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from forward_proxy.store.base import CacheStore, Entry

R = TypeVar("R")

_READS_ON_LOOP = frozenset({"disk", "memory"})
_WRITES_ON_LOOP = frozenset({"memory"})
# Every call in these threads ends within the store's own timeout (Redis: socket_timeout, one retry), so
# they bound how many store calls wait at once, not how long.
STORE_THREADS = 32

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _store_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="store-io")
        return _executor


async def in_store_thread(work: Callable[..., R], *args: Any) -> R:
    """`work(*args)` in one of the store's own worker threads (with the caller's context variables, as
    `asyncio.to_thread`), never in the loop's default executor."""
    call = functools.partial(contextvars.copy_context().run, work, *args)
    return await asyncio.get_running_loop().run_in_executor(_store_executor(), call)


class AsyncStore:
    """`CacheStore` calls for the event loop. Raises `StoreError` as the store does."""

    def __init__(self, store: CacheStore, *, kind: str) -> None:
        self.store = store
        self.kind = kind
        self._reads_on_loop = kind in _READS_ON_LOOP
        self._writes_on_loop = kind in _WRITES_ON_LOOP

    async def get_many(self, keys: Sequence[str]) -> dict[str, Entry | None]:
        """The entry under each distinct key (None where there is none), in one call."""

        def read() -> dict[str, Entry | None]:
            get = self.store.get
            return {key: get(key) for key in dict.fromkeys(keys)}

        return read() if self._reads_on_loop else await in_store_thread(read)

    async def set_many(self, items: Sequence[tuple[str, Entry, float]]) -> int:
        """Store (key, entry, expire seconds) items; how many entries were evicted to make room."""

        def write() -> int:
            return sum(self.store.set(key, entry, expire) for key, entry, expire in items)

        return write() if self._writes_on_loop else await in_store_thread(write)
