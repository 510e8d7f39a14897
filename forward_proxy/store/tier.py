"""The optional memory tier: a small, short-lived copy of the hottest entries in front of any store.

The disk or Redis store stays the shared truth; the tier only saves the round trip (a Redis GET over the
network, an SQLite read and unpickling) for the answers asked most often. See `MemoryTier` for what it
guarantees, and docs/configuration.md for the `cache_memory_tier` options.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

from forward_proxy.store.base import CacheStore, Entry, StoreError, Volume
from forward_proxy.store.memory import MemoryStore


class MemoryTier:
    """A small, short-lived copy of the hottest entries of another store, in this process's memory.

    Reads look in memory first, then in `backend` (and keep what they found there for at most `ttl`
    seconds); writes and deletes go to both. Memory is bounded by `size_limit` bytes (least recently used
    out first). It never serves what the cache must not:

    - purged entries: a delete through this tier leaves memory at once; a delete by any other process
      moves the backend's purge generation (`generation()`), which this tier reads at most every
      `check_interval` seconds before it serves from memory, and on a change it forgets everything. When the
      generation cannot be read (the backend is down) it serves nothing from memory.
    - entries of another model version: the copy is the stored `Entry`, `model_version` included, and the
      cache checks it on every hit, as it does for the backend's.
    - expired entries: a copy lives at most `ttl` seconds and never beyond the expiry it was stored with.

    An entry that another process replaced (a refresh) may be served from memory for up to `ttl` seconds
    after the replacement: keep `ttl` short (seconds). `generation` None (a backend without purge
    generation) limits purge visibility to deletes made through this tier.

    >>> backend = MemoryStore()
    >>> tier = MemoryTier(backend, size_limit=2**20, ttl=2.0, generation=None)
    >>> tier.get("k") is None
    True
    """

    def __init__(
        self,
        backend: CacheStore,
        *,
        size_limit: int,
        ttl: float,
        generation: Callable[[], int] | None,
        check_interval: float = 0.1,
    ) -> None:
        self.backend = backend
        self.ttl = ttl
        self.check_interval = check_interval
        self._memory = MemoryStore(size_limit)
        self._generation_of = generation
        self._generation: int | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()

    def get(self, key: str) -> Entry | None:
        seen = self._current_generation()
        if seen is not None or self._generation_of is None:
            entry = self._memory.get(key)
            if entry is not None:
                return entry
        entry = self.backend.get(key)
        if entry is not None:
            self._remember(key, entry, self.ttl, seen)
        return entry

    def set(self, key: str, entry: Entry, expire_seconds: float) -> int:
        seen = self._current_generation()
        evicted = self.backend.set(key, entry, expire_seconds)
        self._remember(key, entry, min(self.ttl, expire_seconds), seen)
        return evicted

    def set_many_now(self, items: Sequence[tuple[str, Entry, float]]) -> bool:
        """The backend's `set_many_now` (False where it has none), remembered here when it stored."""
        write_now = getattr(self.backend, "set_many_now", None)
        if write_now is None:
            return False
        seen = self._current_generation()
        if not write_now(items):
            return False
        for key, entry, expire_seconds in items:
            self._remember(key, entry, min(self.ttl, expire_seconds), seen)
        return True

    def delete(self, key: str) -> bool:
        self._memory.delete(key)
        return self.backend.delete(key)

    def iter_entries(self) -> Iterator[tuple[str, Entry]]:
        return self.backend.iter_entries()

    def volume(self) -> Volume:
        return self.backend.volume()

    def flush(self) -> int:
        """The backend's optional bookkeeping (diskcache's access times and eviction), as the cache addon
        calls it; how many entries it evicted."""
        flush = getattr(self.backend, "flush", None)
        evicted = flush() if flush is not None else 0
        return evicted if isinstance(evicted, int) else 0

    def memory_volume(self) -> Volume:
        """What the tier itself holds."""
        return self._memory.volume()

    def close(self) -> None:
        self.backend.close()

    def _remember(self, key: str, entry: Entry, ttl: float, seen: int | None) -> None:
        if self._generation_of is not None and seen is None:
            return
        with self._lock:
            if self._generation != seen:  # a purge was noticed since this read began: the copy may be gone
                return
            self._memory.set(key, entry, ttl)

    def _current_generation(self) -> int | None:
        """The backend's purge generation (re-read at most every `check_interval`), None when unknown."""
        read = self._generation_of
        if read is None:
            return None
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at < self.check_interval:
                return self._generation
        try:
            generation: int | None = read()
        except StoreError:
            generation = None
        with self._lock:
            self._checked_at = now
            if generation != self._generation or generation is None:
                self._memory = MemoryStore(self._memory.size_limit)
            self._generation = generation
            return generation
