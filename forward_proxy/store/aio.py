"""The store as the event loop sees it: every call awaitable, and one place that decides, per backend,
what may run on the loop and what runs in a worker thread.

- diskcache (`kind == "disk"`): a read is one SELECT on a local SQLite database in WAL mode, where
  readers never wait for writers; it costs less than handing it to a thread (about 30 µs against 80 µs),
  so reads run on the loop. Writes run on the loop too, a few loop iterations after they were asked for
  (`WRITE_TURNS`: for the cache, once the answer they store has been sent), everything asked meanwhile
  in one transaction (`DiskStore.set_many_now`) that never waits for the write lock: when another
  process holds it, and for entries large enough to be files of their own, the write goes to a worker
  thread, which waits. A small write takes about 0.1 ms of the loop, while the client reads its answer;
  in a worker thread the same write cost a miss about 0.7 ms (the thread handoffs, both threads taking
  turns at the GIL, and the loop's next read re-reading the pages another connection had changed).
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

from forward_proxy.store.base import CacheStore, Entry, StoreError

R = TypeVar("R")
Items = Sequence[tuple[str, Entry, float]]  # (key, entry, expire seconds)

_READS_ON_LOOP = frozenset({"disk", "memory"})
_WRITES_ON_LOOP = frozenset({"memory"})
_WRITES_NOW = frozenset({"disk"})  # on the loop when they need not wait (`set_many_now`), else in a thread
LOOP_ENTRY_BYTES = 24 * 1024  # larger entries are written in a thread (diskcache makes files of them)
LOOP_BATCH_BYTES = 256 * 1024  # what one write on the loop stores at most; more goes to a thread
# Loop iterations a write on the loop waits, so that what the caller does next goes first: mitmproxy
# sends the answer of a `response` hook two iterations after the hook (its store write then runs while
# the client reads the answer, not before the answer leaves). Writes asked meanwhile join the same one.
WRITE_TURNS = 3
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
        self._write_now = getattr(store, "set_many_now", None) if kind in _WRITES_NOW else None
        self._batch: list[tuple[Items, asyncio.Future[bool]]] = []
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        self._batch_bytes = 0

    async def get_many(self, keys: Sequence[str]) -> dict[str, Entry | None]:
        """The entry under each distinct key (None where there is none), in one call."""

        def read() -> dict[str, Entry | None]:
            get = self.store.get
            return {key: get(key) for key in dict.fromkeys(keys)}

        return read() if self._reads_on_loop else await in_store_thread(read)

    async def set_many(self, items: Items) -> int:
        """Store (key, entry, expire seconds) items; how many entries were evicted to make room."""

        def write() -> int:
            return sum(self.store.set(key, entry, expire) for key, entry, expire in items)

        if self._writes_on_loop:
            return write()
        size = sum(entry.size for _, entry, _ in items)
        if (
            self._write_now is not None
            and all(entry.size <= LOOP_ENTRY_BYTES for _, entry, _ in items)
            and self._batch_bytes + size <= LOOP_BATCH_BYTES
            and await self._on_the_loop(items, size)
        ):
            return 0  # `set_many_now` evicts nothing: the store's `flush` does
        return await in_store_thread(write)

    def _on_the_loop(self, items: Items, size: int) -> asyncio.Future[bool]:
        """Whether `items` were stored by the next write on the loop (False: it would have had to wait for
        the write lock)."""
        loop = asyncio.get_running_loop()
        if self._batch and self._batch_loop is not loop:  # left by a loop that stopped before writing it
            self._batch, self._batch_bytes = [], 0
        if not self._batch:
            self._batch_loop = loop
            loop.call_soon(self._write_batch_after, WRITE_TURNS)
        stored: asyncio.Future[bool] = loop.create_future()
        self._batch.append((items, stored))
        self._batch_bytes += size
        return stored

    def _write_batch_after(self, turns: int) -> None:
        if turns > 1:
            asyncio.get_running_loop().call_soon(self._write_batch_after, turns - 1)
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        assert self._write_now is not None
        try:
            stored = bool(self._write_now([item for items, _ in batch for item in items]))
        except Exception as exc:  # every waiter hears of it: none may wait forever
            for _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(exc if isinstance(exc, StoreError) else StoreError(repr(exc)))
            return
        for _, waiter in batch:
            if not waiter.done():
                waiter.set_result(stored)
