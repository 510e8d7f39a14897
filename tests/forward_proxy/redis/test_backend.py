"""Choosing the backend: diskcache or Redis behind one function, the memory tier in front of either, and
purges that reach the memory tiers of other processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from forward_proxy.store.backend import PurgeGeneration, check_backend, open_backend
from forward_proxy.store.disk import DiskStore
from forward_proxy.store.redis import RedisStore
from tests.forward_proxy.redis.conftest import make_entry
from tests.support.redis_server import RedisServer


@pytest.mark.parametrize("spec", ["", "redis://127.0.0.1:6379/0", "rediss+cluster://node:7000"])
def test_good_specs(spec: str) -> None:
    check_backend(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/var/cache", "is not a backend"),
        ("memcached://x:1", "is not a backend"),
        ("redis:///0", "names no host"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_backend(spec)


def test_the_default_is_diskcache_in_the_directory(tmp_path: Path) -> None:
    backend = open_backend("", tmp_path, 2**20)
    assert backend.kind == "disk" and backend.flight is None and backend.memory_tier is None
    assert backend.describe() == f"{tmp_path}, 1.0 MiB"
    backend.entries.set("k", make_entry(), 60)
    assert DiskStore(tmp_path / "entries").get("k") is not None  # the same files open_store uses
    assert backend.partition_secret() == (tmp_path / "partition.key").read_bytes()


def test_purge_generation_counts_every_bump(tmp_path: Path) -> None:
    generation = PurgeGeneration(tmp_path / "purge-generation")
    assert generation.read() == 0
    for _ in range(3):
        generation.bump()
    assert generation.read() == 3


def test_a_purge_by_another_process_reaches_the_disk_memory_tier(tmp_path: Path) -> None:
    proxy = open_backend("", tmp_path, 2**20, memory_tier=2**20, memory_ttl=60)
    command = open_backend("", tmp_path, None)  # `forward-proxy cache purge`, another process
    proxy.entries.set("k", make_entry(), 60)
    assert proxy.entries.get("k") is not None
    assert command.entries.delete("k") is True
    deadline = time.monotonic() + 2
    while proxy.entries.get("k") is not None:
        assert time.monotonic() < deadline, "the purge never reached the memory tier"
        time.sleep(0.02)


@pytest.mark.redis
def test_redis_backend(redis_server: RedisServer, tmp_path: Path) -> None:
    first = open_backend(redis_server.url, tmp_path / "unused", None, memory_tier=2**20)
    second = open_backend(redis_server.url, tmp_path / "unused", None)
    assert first.kind == "redis" and first.flight is not None
    assert first.describe() == f"{redis_server.url}, memory tier 1.0 MiB for 2s"
    assert isinstance(second.entries, RedisStore)
    assert first.partition_secret() == second.partition_secret()
    first.entries.set("k", make_entry(), 60)
    assert second.entries.get("k") is not None
    second.entries.delete("k")
    deadline = time.monotonic() + 2
    while first.entries.get("k") is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not (tmp_path / "unused").exists()  # Redis needs no cache directory
