"""In-process stores: for tests, and as the fallback when the configured store cannot be opened."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from forward_proxy.store.base import Entry, Volume


class MemoryStore:
    """Entries in a dict, least recently used evicted beyond `size_limit` bytes; expiry on read."""

    def __init__(self, size_limit: int | None = None) -> None:
        self.size_limit = size_limit
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Entry | None:
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return None
            if item[1] <= time.time():
                self._remove(key)
                return None
            self._entries.move_to_end(key)
            return item[0]

    def set(self, key: str, entry: Entry, expire_seconds: float) -> int:
        with self._lock:
            if key in self._entries:
                self._remove(key)
            self._entries[key] = (entry, time.time() + expire_seconds)
            self._size += entry.size
            evicted = 0
            while self.size_limit is not None and self._size > self.size_limit and self._entries:
                self._remove(next(iter(self._entries)))
                evicted += 1
            return evicted

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._remove(key)

    def iter_entries(self) -> Iterator[tuple[str, Entry]]:
        now = time.time()
        with self._lock:
            items = [(key, entry) for key, (entry, expires) in self._entries.items() if expires > now]
        yield from items

    def volume(self) -> Volume:
        with self._lock:
            return Volume(len(self._entries), self._size, self.size_limit)

    def close(self) -> None:
        pass

    def _remove(self, key: str) -> bool:
        item = self._entries.pop(key, None)
        if item is not None:
            self._size -= item[0].size
        return item is not None


class MemoryCounterStore:
    """Counters in a dict; atomic across the threads of one process only."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._started_at = time.time()
        self._lock = threading.Lock()

    def incr(self, name: str, amount: int = 1) -> None:
        self.incr_many({name: amount})

    def incr_many(self, amounts: dict[str, int]) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._counts[name] = self._counts.get(name, 0) + amount

    def read_all(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def started_at(self) -> float:
        return self._started_at

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._started_at = time.time()

    def close(self) -> None:
        pass
