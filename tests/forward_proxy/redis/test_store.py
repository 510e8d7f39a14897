"""The Redis store and counters against a real redis-server: same semantics as diskcache, failures as
StoreError, and the URL forms (cluster, sentinel, TLS) against the real thing."""

from __future__ import annotations

import logging
import multiprocessing
import time
from pathlib import Path

import pytest

from forward_proxy.store.base import StoreError
from forward_proxy.store.redis import RedisStore, open_redis
from tests.forward_proxy.redis.conftest import make_entry
from tests.support.redis_server import RedisServer, Sentinel
from tests.support.upstream import self_signed_certificate

pytestmark = pytest.mark.redis


def test_entry_round_trips_with_every_field(redis_server: RedisServer) -> None:
    entries, _ = open_redis(redis_server.url)
    entry = make_entry(b"\x00\xff binary \xe2\x82\xac", model_version=None)
    assert entries.get("a") is None
    assert entries.set("a", entry, expire_seconds=60) == 0
    assert entries.get("a") == entry
    assert [(key, stored.key_id) for key, stored in entries.iter_entries()] == [("a", "k1")]
    assert entries.delete("a") is True
    assert entries.delete("a") is False
    assert entries.get("a") is None


def test_entries_expire_through_redis_ttl(redis_server: RedisServer) -> None:
    entries, _ = open_redis(redis_server.url)
    entries.set("a", make_entry(), expire_seconds=0.05)
    assert int(redis_server.command("PTTL", "fp:entry:a")[1:].split(b"\r")[0]) > 0
    time.sleep(0.1)
    assert entries.get("a") is None
    assert list(entries.iter_entries()) == []


def test_volume_counts_only_this_prefix_and_reports_maxmemory(redis_server: RedisServer) -> None:
    ours, _ = open_redis(redis_server.url)
    theirs, _ = open_redis(redis_server.url + "?prefix=other:")
    for index in range(3):
        ours.set(f"k{index}", make_entry(b"x" * 1000), expire_seconds=60)
    theirs.set("k0", make_entry(), expire_seconds=60)
    volume = ours.volume()
    assert volume.entries == 3
    assert 3000 < volume.size_bytes < 4000
    assert volume.limit_bytes is None  # the test server has no maxmemory
    assert [key for key, _ in theirs.iter_entries()] == ["k0"]
    redis_server.command("CONFIG", "SET", "maxmemory", "64mb")
    fresh = RedisStore(ours.connection, volume_seconds=0)
    assert fresh.volume().limit_bytes == 64 * 2**20


def test_listing_many_entries_uses_batches(redis_server: RedisServer) -> None:
    entries, _ = open_redis(redis_server.url)
    for index in range(450):
        entries.set(f"k{index:03}", make_entry(key_id=f"id{index}"), expire_seconds=60)
    listed = dict(entries.iter_entries())
    assert len(listed) == 450 and listed["k449"].key_id == "id449"
    assert entries.volume().entries == 450


def test_delete_moves_the_purge_generation_for_every_process(redis_server: RedisServer) -> None:
    first, _ = open_redis(redis_server.url)
    second, _ = open_redis(redis_server.url)
    before = second.purge_generation()
    first.set("a", make_entry(), expire_seconds=60)
    first.delete("a")
    assert second.purge_generation() == before + 1


def test_a_foreign_value_is_a_store_error_not_a_crash(redis_server: RedisServer) -> None:
    entries, _ = open_redis(redis_server.url)
    redis_server.command("SET", "fp:entry:a", "not an entry")
    redis_server.command("SET", "fp:entry:b", "FPE1\x00\x00\x00\x05{bad}")
    with pytest.raises(StoreError, match="not an entry of this proxy"):
        entries.get("a")
    with pytest.raises(StoreError, match="damaged entry"):
        entries.get("b")
    entries.set("c", make_entry(), expire_seconds=60)
    assert [key for key, _ in entries.iter_entries()] == ["c"]  # the listing skips what it cannot read


def test_the_partition_secret_is_made_once_for_the_fleet(redis_server: RedisServer) -> None:
    first, _ = open_redis(redis_server.url)
    second, _ = open_redis(redis_server.url)
    secret = first.partition_secret()
    assert len(secret) == 32
    assert second.partition_secret() == secret
    other, _ = open_redis(redis_server.url + "?prefix=team-b:")
    assert other.partition_secret() != secret


def test_counters_add_up_survive_reopening_and_reset(redis_server: RedisServer) -> None:
    _, counters = open_redis(redis_server.url)
    started = counters.started_at()
    counters.incr("hits|o|r|", 2)
    counters.incr_many({"hits|o|r|": 1, "misses|o|r|": 5})
    counters.close()
    _, again = open_redis(redis_server.url)
    assert again.read_all() == {"hits|o|r|": 3, "misses|o|r|": 5}
    assert again.started_at() == started
    again.reset()
    assert again.read_all() == {}
    assert again.started_at() > started


def test_started_at_is_set_by_the_first_count_and_kept(redis_server: RedisServer) -> None:
    _, counters = open_redis(redis_server.url)
    before = time.time()
    counters.incr("hits|o|r|")
    _, other = open_redis(redis_server.url)
    first = other.started_at()
    other.incr("hits|o|r|")
    assert before - 1 <= first <= time.time()
    assert counters.started_at() == first


def _add_many(url: str) -> None:
    _, counters = open_redis(url)
    for _ in range(200):
        counters.incr_many({"hits|o|r|": 1, "requests|o|r|": 1})
    counters.close()


def test_counter_increments_are_atomic_across_processes(redis_server: RedisServer) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(redis_server.url,)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    _, counters = open_redis(redis_server.url)
    assert counters.read_all() == {"hits|o|r|": 600, "requests|o|r|": 600}


def test_maxmemory_warnings_at_first_contact(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="forward_proxy.store.redis")
    with RedisServer(tmp_path, name="unbounded") as unbounded:
        entries, _ = open_redis(unbounded.url)
        entries.get("a")
        entries.get("b")
    assert [r.message for r in caplog.records if "no maxmemory" in r.message] != []
    assert len([r for r in caplog.records if "no maxmemory" in r.message]) == 1  # once, not per call
    caplog.clear()
    with RedisServer(
        tmp_path, "--maxmemory", "10mb", "--maxmemory-policy", "noeviction", name="full"
    ) as full:
        open_redis(full.url)[0].get("a")
    assert any("noeviction" in r.message and "every write fails" in r.message for r in caplog.records)
    caplog.clear()
    with RedisServer(
        tmp_path, "--maxmemory", "10mb", "--maxmemory-policy", "volatile-lru", name="good"
    ) as good:
        open_redis(good.url)[0].get("a")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_full_redis_without_eviction_refuses_writes_as_store_errors(tmp_path: Path) -> None:
    with RedisServer(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction") as server:
        entries, _ = open_redis(server.url)
        with pytest.raises(StoreError, match="refused"):
            for index in range(100):
                entries.set(f"k{index}", make_entry(b"x" * 100_000), expire_seconds=60)
        assert entries.get("k0") is not None  # reads still work: it is full, not gone


def test_lru_eviction_keeps_redis_within_maxmemory(tmp_path: Path) -> None:
    with RedisServer(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "volatile-lru") as server:
        entries, counters = open_redis(server.url)
        counters.incr("hits|o|r|")
        for index in range(100):  # 10 MB of entries through a 4 MB Redis
            entries.set(f"k{index}", make_entry(b"x" * 100_000), expire_seconds=60)
        assert entries.get("k99") is not None
        assert 0 < entries.volume().entries < 100
        assert counters.read_all() == {"hits|o|r|": 1}  # counters carry no TTL: volatile-lru keeps them


def test_a_dead_redis_costs_milliseconds_and_is_retried(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="forward_proxy.store.redis")
    entries, counters = open_redis(redis_server.url + "?retry_interval=0.3")
    entries.set("a", make_entry(), expire_seconds=60)
    redis_server.stop()
    started = time.perf_counter()
    for _ in range(50):
        with pytest.raises(StoreError, match=r"Redis at redis://127\.0\.0\.1"):
            entries.get("a")
        with pytest.raises(StoreError):
            counters.incr("hits|o|r|")
    assert time.perf_counter() - started < 0.5  # 100 calls on a dead Redis
    outages = [r for r in caplog.records if "unreachable" in r.message]
    assert len(outages) == 1 and "forwarded uncached" in outages[0].message
    redis_server.start()
    deadline = time.monotonic() + 10
    while True:  # the data is gone (nothing is persisted) but the store works again, unrestarted
        try:
            assert entries.get("a") is None
            break
        except StoreError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    entries.set("a", make_entry(), expire_seconds=60)
    assert entries.get("a") is not None
    counters.incr("hits|o|r|")
    assert counters.read_all() == {"hits|o|r|": 1}
    assert len([r for r in caplog.records if "is back after" in r.message]) == 1


def test_redis_down_at_open_is_not_fatal(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    entries, counters = open_redis(server.url + "?retry_interval=0")  # nothing listens yet
    with pytest.raises(StoreError):
        entries.get("a")
    with pytest.raises(StoreError):
        counters.started_at()
    with server:
        entries.set("a", make_entry(), expire_seconds=60)
        assert entries.get("a") is not None
        counters.incr("hits|o|r|")
        assert counters.read_all() == {"hits|o|r|": 1}


def test_a_hung_redis_times_out_quickly(redis_server: RedisServer) -> None:
    entries, _ = open_redis(redis_server.url)
    entries.get("a")
    redis_server.command("CLIENT", "PAUSE", "2000", "ALL")
    started = time.perf_counter()
    with pytest.raises(StoreError, match="Timeout"):
        entries.get("a")
    assert time.perf_counter() - started < 1.5  # socket_timeout 0.5 s, one retry


def test_a_wrong_password_is_a_store_error(tmp_path: Path) -> None:
    with RedisServer(tmp_path, "--requirepass", "right") as server:
        wrong, _ = open_redis(f"redis://:wrong@127.0.0.1:{server.port}/0")
        with pytest.raises(StoreError) as raised:
            wrong.get("a")
        assert "wrong" not in str(raised.value)
        right, _ = open_redis(f"redis://:right@127.0.0.1:{server.port}/0")
        right.set("a", make_entry(), expire_seconds=60)
        assert right.get("a") is not None


def test_cluster_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path, cluster=True) as server:
        entries, counters = open_redis(server.cluster_url)
        for index in range(20):  # keys in many hash slots
            entries.set(f"k{index}", make_entry(key_id=f"id{index}"), expire_seconds=60)
        assert entries.get("k7") is not None
        assert len(dict(entries.iter_entries())) == 20
        assert entries.volume().entries == 20
        assert entries.delete("k7") and entries.purge_generation() == 1
        counters.incr_many({"hits|o|r|": 2, "misses|o|r|": 1})
        assert counters.read_all() == {"hits|o|r|": 2, "misses|o|r|": 1}
        counters.reset()
        assert counters.read_all() == {}


def test_sentinel_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as master, Sentinel(tmp_path, master) as sentinel:
        entries, counters = open_redis(sentinel.url)
        entries.set("a", make_entry(), expire_seconds=60)
        assert entries.get("a") is not None
        counters.incr("hits|o|r|")
        assert counters.read_all() == {"hits|o|r|": 1}
        assert b"fp:entry:a" in master.command("KEYS", "fp:*")  # it reached the master Sentinel names


def test_tls_url(tmp_path: Path) -> None:
    pem = self_signed_certificate(tmp_path / "tls")
    with RedisServer(tmp_path, tls_certificate=pem) as server:
        entries, _ = open_redis(server.url)
        entries.set("a", make_entry(), expire_seconds=60)
        assert entries.get("a") is not None
        plain, _ = open_redis(f"redis://127.0.0.1:{server.port}/0")
        with pytest.raises(StoreError):
            plain.get("a")
