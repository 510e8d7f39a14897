"""The store as the event loop sees it: diskcache writes on the loop, batched, never waiting for a lock."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from forward_proxy.store.aio import WRITE_TURNS, AsyncStore
from forward_proxy.store.base import Entry
from forward_proxy.store.disk import DiskStore
from forward_proxy.store.memory import MemoryStore
from tests.forward_proxy.store.test_disk import make_entry


class RecordingStore(MemoryStore):
    """A memory store with diskcache's one-step write, recording where and how each write ran."""

    def __init__(self, *, locked: bool = False) -> None:
        super().__init__()
        self.locked = locked
        self.now_calls: list[list[str]] = []
        self.set_threads: list[int] = []

    def set_many_now(self, items: list[tuple[str, Entry, float]]) -> bool:
        self.now_calls.append([key for key, _, _ in items])
        if self.locked:
            return False
        for key, entry, expire in items:
            super().set(key, entry, expire)
        return True

    def set(self, key: str, entry: Entry, expire_seconds: float) -> int:
        self.set_threads.append(threading.get_ident())
        return super().set(key, entry, expire_seconds)


def test_writes_asked_together_are_one_write_on_the_loop_after_a_few_iterations() -> None:
    store = RecordingStore()

    async def main() -> list[bool]:
        aio = AsyncStore(store, kind="disk")
        writes = [asyncio.ensure_future(aio.set_many([(key, make_entry(), 60)])) for key in "abc"]
        seen = []
        for _ in range(WRITE_TURNS + 1):  # what runs in those iterations goes first
            seen.append(bool(store.now_calls))
            await asyncio.sleep(0)
        assert await asyncio.gather(*writes) == [0, 0, 0]
        return seen

    seen = asyncio.run(main())
    assert seen[:WRITE_TURNS] == [False] * WRITE_TURNS
    assert store.now_calls == [["a", "b", "c"]]
    assert store.set_threads == []
    assert store.get("b") is not None


def test_a_write_left_by_a_loop_that_stopped_does_not_hold_up_the_next_loop() -> None:
    store = RecordingStore()
    aio = AsyncStore(store, kind="disk")

    async def leave_one() -> None:
        asked = asyncio.ensure_future(aio.set_many([("a", make_entry(), 60)]))
        await asyncio.sleep(0)  # asked, not yet written: the loop stops here
        assert not asked.done()

    stopped = asyncio.new_event_loop()
    stopped.run_until_complete(leave_one())
    stopped.close()
    asyncio.run(asyncio.wait_for(aio.set_many([("b", make_entry(), 60)]), 5))
    assert store.get("b") is not None


def test_a_write_that_would_wait_for_the_lock_goes_to_a_worker_thread() -> None:
    store = RecordingStore(locked=True)

    async def main() -> None:
        await AsyncStore(store, kind="disk").set_many([("a", make_entry(), 60)])

    asyncio.run(main())
    assert store.now_calls == [["a"]]
    assert len(store.set_threads) == 1 and store.set_threads[0] != threading.get_ident()
    assert store.get("a") is not None


def test_an_entry_too_large_for_the_loop_is_written_in_a_worker_thread() -> None:
    store = RecordingStore()

    async def main() -> None:
        await AsyncStore(store, kind="disk").set_many([("a", make_entry(b"x" * 100_000), 60)])

    asyncio.run(main())
    assert store.now_calls == []
    assert len(store.set_threads) == 1


def test_disk_writes_on_the_loop_never_wait_for_another_connections_lock(tmp_path: Path) -> None:
    entries = DiskStore(tmp_path / "entries", 2**20)
    first, second = make_entry(key_id="k1"), make_entry(key_id="k2")
    holder = sqlite3.connect(tmp_path / "entries" / "cache.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction
    started = time.monotonic()
    assert entries.set_many_now([("a", first, 60)]) is False
    assert time.monotonic() - started < 1.0
    holder.execute("COMMIT")
    holder.close()
    assert entries.get("a") is None
    assert entries.set_many_now([("a", first, 60), ("b", second, 60)]) is True
    assert (entries.get("a"), entries.get("b")) == (first, second)
    # The connections of every other call wait for the lock, as diskcache sets them up.
    assert entries._cache._con.execute("PRAGMA busy_timeout").fetchone()[0] == 60_000
    entries.close()
