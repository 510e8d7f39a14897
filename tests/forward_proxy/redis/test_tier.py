"""The memory tier: serves hot entries from memory, bounded in bytes and time, and never serves an entry
that a purge anywhere has removed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from forward_proxy.store.base import Entry, StoreError
from forward_proxy.store.memory import MemoryStore
from forward_proxy.store.redis import open_redis
from forward_proxy.store.tier import MemoryTier
from tests.forward_proxy.redis.conftest import make_entry
from tests.support.redis_server import RedisServer


class CountingStore(MemoryStore):
    """A backend that counts its reads and can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.failing = False

    def get(self, key: str) -> Entry | None:
        self.reads += 1
        if self.failing:
            raise StoreError("backend down")
        return super().get(key)


class Generation:
    def __init__(self) -> None:
        self.value = 0
        self.failing = False

    def __call__(self) -> int:
        if self.failing:
            raise StoreError("backend down")
        return self.value


@pytest.fixture
def backend() -> Iterator[CountingStore]:
    yield CountingStore()


def test_hot_entries_are_served_from_memory(backend: CountingStore) -> None:
    tier = MemoryTier(backend, size_limit=2**20, ttl=60, generation=Generation())
    backend.set("k", make_entry(), 60)
    assert tier.get("k") is not None and backend.reads == 1
    for _ in range(10):
        assert tier.get("k") is not None
    assert backend.reads == 1
    assert tier.memory_volume().entries == 1


def test_writes_go_through_and_are_kept(backend: CountingStore) -> None:
    tier = MemoryTier(backend, size_limit=2**20, ttl=60, generation=Generation())
    tier.set("k", make_entry(), 60)
    assert backend.get("k") is not None
    reads = backend.reads
    assert tier.get("k") is not None and backend.reads == reads


def test_copies_live_at_most_ttl_and_never_past_their_expiry(backend: CountingStore) -> None:
    tier = MemoryTier(backend, size_limit=2**20, ttl=0.05, generation=Generation())
    tier.set("short", make_entry(), 60)
    time.sleep(0.06)
    tier.get("short")
    assert backend.reads == 1  # the copy lapsed, the backend was asked again
    long_tier = MemoryTier(backend, size_limit=2**20, ttl=60, generation=Generation())
    long_tier.set("expiring", make_entry(), 0.05)
    time.sleep(0.06)
    assert long_tier.get("expiring") is None


def test_memory_is_bounded_in_bytes(backend: CountingStore) -> None:
    tier = MemoryTier(backend, size_limit=1000, ttl=60, generation=Generation())
    for index in range(10):
        tier.set(f"k{index}", make_entry(b"x" * 300), 60)
    assert tier.memory_volume().size_bytes <= 1000
    assert tier.volume().entries == 10  # the backend keeps all of them


def test_a_delete_through_the_tier_forgets_at_once(backend: CountingStore) -> None:
    tier = MemoryTier(backend, size_limit=2**20, ttl=60, generation=None)
    tier.set("k", make_entry(), 60)
    assert tier.delete("k") is True
    assert tier.get("k") is None


def test_a_purge_elsewhere_is_seen_within_the_check_interval(backend: CountingStore) -> None:
    generation = Generation()
    tier = MemoryTier(backend, size_limit=2**20, ttl=60, generation=generation, check_interval=0.05)
    tier.set("k", make_entry(), 60)
    backend.delete("k")  # another process purges ...
    generation.value += 1  # ... and the shared generation moves
    time.sleep(0.06)
    assert tier.get("k") is None


def test_nothing_is_served_from_memory_while_the_generation_is_unknown(backend: CountingStore) -> None:
    generation = Generation()
    tier = MemoryTier(backend, size_limit=2**20, ttl=60, generation=generation, check_interval=0)
    tier.set("k", make_entry(), 60)
    generation.failing = backend.failing = True
    with pytest.raises(StoreError):
        tier.get("k")  # not the memory copy: a purge may have happened that this process cannot see
    generation.failing = backend.failing = False
    assert tier.get("k") is not None


def test_a_read_that_overlaps_a_purge_is_not_kept(backend: CountingStore) -> None:
    generation = Generation()
    tier = MemoryTier(backend, size_limit=2**20, ttl=60, generation=generation, check_interval=0)
    backend.set("k", make_entry(), 60)
    original_get = backend.get

    def get_then_purge(key: str) -> Entry | None:
        entry = original_get(key)  # read before the purge ...
        backend.delete(key)
        generation.value += 1  # ... purged, and noticed by another thread's check
        tier._current_generation()
        return entry

    backend.get = get_then_purge  # type: ignore[method-assign]
    assert tier.get("k") is not None  # this one read was already under way
    backend.get = original_get  # type: ignore[method-assign]
    assert tier.get("k") is None  # but its copy was not kept


def test_the_copy_carries_the_model_version_the_cache_checks(backend: CountingStore) -> None:
    tier = MemoryTier(backend, size_limit=2**20, ttl=60, generation=Generation())
    tier.set("k", make_entry(model_version="v7"), 60)
    entry = tier.get("k")
    assert entry is not None and entry.model_version == "v7"


@pytest.mark.redis
def test_a_purge_through_another_process_reaches_this_tier(redis_server: RedisServer) -> None:
    here, _ = open_redis(redis_server.url)
    elsewhere, _ = open_redis(redis_server.url)  # another proxy, or `forward-proxy cache purge`
    tier = MemoryTier(here, size_limit=2**20, ttl=60, generation=here.purge_generation, check_interval=0.05)
    tier.set("k", make_entry(), 60)
    assert tier.get("k") is not None
    assert elsewhere.delete("k") is True
    deadline = time.monotonic() + 1.0
    while tier.get("k") is not None:
        assert time.monotonic() < deadline, "the purge never reached the memory tier"
        time.sleep(0.01)
