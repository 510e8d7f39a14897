"""Which store a proxy, `forward-proxy stats` and `forward-proxy cache` use: one function, `open_backend`.

    cache_backend ""                      diskcache in the cache directory (the default, one host)
    cache_backend "redis://host:6379/0"   Redis, shared by every proxy that names it (see `redis/`)

with the optional memory tier (`tier.py`) in front of either. The `Backend` it returns holds the entry and
counter stores, the key secret every process on that backend shares, and, for Redis, the fleet-wide
single flight (`locks.py`).

The memory tiers of other processes learn of deletes (purges) through a purge generation that every
delete moves: in Redis (`<prefix>purge-generation`) or, for diskcache, in the file
`<cache_dir>/purge-generation`.

>>> import tempfile; from pathlib import Path
>>> backend = open_backend("", Path(tempfile.mkdtemp()), 2**20, memory_tier=2**20)
>>> backend.describe().endswith("memory tier 1.0 MiB for 2s")
True
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forward_proxy.cache.units import format_duration, format_size
from forward_proxy.store.base import CacheStore, CounterStore, Entry, StoreError, Volume
from forward_proxy.store.disk import load_partition_secret, open_store
from forward_proxy.store.locks import DEFAULT_LEASE, FleetFlight
from forward_proxy.store.redis import RedisStore, is_redis_url, open_redis, parse_redis_url
from forward_proxy.store.tier import MemoryTier

DEFAULT_MEMORY_TTL = 2.0
PURGE_CHECK_SECONDS = 0.1


def check_backend(spec: str) -> None:
    """`ValueError` with a sentence when `spec` is neither empty (diskcache) nor a valid Redis URL."""
    if spec and not is_redis_url(spec):
        raise ValueError(
            f"{spec!r} is not a backend: leave it empty for the cache directory, or give a Redis URL such "
            "as redis://127.0.0.1:6379/0 (see docs/deployment.md)"
        )
    if spec:
        parse_redis_url(spec)


@dataclass
class Backend:
    entries: CacheStore
    counters: CounterStore
    kind: str  # "disk" or "redis"
    location: str  # the directory, or the Redis URL with its password masked
    partition_secret: Callable[
        [], bytes
    ]  # the secret shared by the backend's processes; may raise StoreError
    flight: FleetFlight[Any] | None = None  # single flight across processes and hosts (Redis only)
    memory_tier: MemoryTier | None = None

    def describe(self) -> str:
        """`redis://host:6379/0` or `/path/to/cache, 1.0 GiB`, then the memory tier if any."""
        text = self.location
        if self.memory_tier is not None:
            tier = self.memory_tier
            text += f", memory tier {format_size(tier.memory_volume().limit_bytes or 0)} for {format_duration(tier.ttl)}"
        return text

    def close(self) -> None:
        self.entries.close()
        self.counters.close()


def open_backend(
    spec: str,
    cache_dir: Path,
    size_limit: int | None,
    *,
    memory_tier: int = 0,
    memory_ttl: float = DEFAULT_MEMORY_TTL,
    lease: float = DEFAULT_LEASE,
) -> Backend:
    """Open the backend `spec` names (empty: diskcache in `cache_dir`, limited to `size_limit` bytes).

    `memory_tier` bytes (0: none) of memory tier in front, keeping copies for `memory_ttl` seconds.
    Raises `ValueError` for a malformed spec and `StoreError` when the cache directory cannot be used;
    a Redis that is down does not fail here (its calls fail until it is back).
    """
    check_backend(spec)
    entries: CacheStore
    counters: CounterStore
    if spec:
        store, counters = open_redis(spec)
        entries, kind, location = store, "redis", store.connection.target.display
        secret: Callable[[], bytes] = store.partition_secret
        generation: Callable[[], int] = store.purge_generation
        flight: FleetFlight[Any] | None = FleetFlight(store.connection, lease=lease)
    else:
        disk, counters = open_store(cache_dir, size_limit)
        purges = PurgeGeneration(cache_dir / "purge-generation")
        entries, kind, flight = PurgeNotifying(disk, purges), "disk", None
        location = str(cache_dir) + (f", {format_size(size_limit)}" if size_limit is not None else "")
        secret, generation = (lambda: load_partition_secret(cache_dir)), purges.read
    tier = None
    if memory_tier > 0:
        tier = MemoryTier(
            entries,
            size_limit=memory_tier,
            ttl=memory_ttl,
            generation=generation,
            check_interval=PURGE_CHECK_SECONDS,
        )
        entries = tier
    return Backend(entries, counters, kind, location, secret, flight, tier)


class PurgeGeneration:
    """A number in a small file that every delete moves on (under an exclusive lock, so none is lost)."""

    WIDTH = 20

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> int:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
        return int(text.strip() or 0)

    def bump(self) -> None:
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write {self.path}: {exc}") from exc
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            current = int(os.pread(descriptor, self.WIDTH, 0).strip() or 0)
            os.pwrite(descriptor, str(current + 1).rjust(self.WIDTH).encode(), 0)
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot write {self.path}: {exc}") from exc
        finally:
            os.close(descriptor)  # also releases the lock


class PurgeNotifying:
    """A store whose deletes also move a `PurgeGeneration` (for the memory tiers of other processes)."""

    def __init__(self, store: CacheStore, purges: PurgeGeneration) -> None:
        self.store = store
        self.purges = purges

    def get(self, key: str) -> Entry | None:
        return self.store.get(key)

    def set(self, key: str, entry: Entry, expire_seconds: float) -> int:
        return self.store.set(key, entry, expire_seconds)

    def set_many_now(self, items: Sequence[tuple[str, Entry, float]]) -> bool:
        write_now = getattr(self.store, "set_many_now", None)
        return bool(write_now(items)) if write_now is not None else False

    def delete(self, key: str) -> bool:
        removed = self.store.delete(key)
        self.purges.bump()
        return removed

    def iter_entries(self) -> Iterator[tuple[str, Entry]]:
        return self.store.iter_entries()

    def volume(self) -> Volume:
        return self.store.volume()

    def flush(self) -> int:
        flush = getattr(self.store, "flush", None)
        evicted = flush() if flush is not None else 0
        return evicted if isinstance(evicted, int) else 0

    def close(self) -> None:
        with contextlib.suppress(StoreError):
            self.store.close()


def redis_entries(backend: Backend) -> RedisStore | None:
    """The Redis store behind `backend` (through its memory tier), None for diskcache."""
    store = backend.memory_tier.backend if backend.memory_tier is not None else backend.entries
    return store if isinstance(store, RedisStore) else None
