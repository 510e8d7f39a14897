"""The diskcache backend: entries with expiry and LRU size bound, shared counters, failures as StoreError."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from forward_proxy.store.base import Entry, StoreError
from forward_proxy.store.disk import DiskCounterStore, DiskStore, load_partition_secret, open_store


def make_entry(content: bytes = b'{"data": [1]}', key_id: str = "k1") -> Entry:
    headers = (("content-type", "application/json"),)
    return Entry(
        status_code=200,
        headers=headers,
        content=content,
        stored_at=time.time(),
        upstream_seconds=0.25,
        model_version="v1",
        origin="http://127.0.0.1:8000",
        route="POST /v1/embeddings",
        model="minilm",
        method="POST",
        path="/v1/embeddings",
        key_id=key_id,
        size=len(content) + 30,
    )


def test_entry_round_trips(tmp_path: Path) -> None:
    entries, _ = open_store(tmp_path, size_limit=2**20)
    entry = make_entry()
    assert entries.get("a") is None
    assert entries.set("a", entry, expire_seconds=60) == 0
    assert entries.get("a") == entry
    assert [key for key, _ in entries.iter_entries()] == ["a"]
    assert entries.volume().entries == 1
    assert entries.delete("a") is True
    assert entries.delete("a") is False
    assert entries.get("a") is None


def test_entries_expire_and_flush_removes_them(tmp_path: Path) -> None:
    entries = DiskStore(tmp_path / "entries", 2**20)
    entries.set("a", make_entry(), expire_seconds=0.05)
    time.sleep(0.1)
    assert entries.get("a") is None
    assert entries.volume().entries == 1
    assert entries.flush() == 1
    assert entries.volume().entries == 0


BIG = b"x" * 40_000  # stored as a file of its own, so the volume follows the entries
LIMIT = 15 * 40_000 + 60_000


def fill(store: DiskStore, count: int) -> None:
    for index in range(count):
        store.set(f"k{index}", make_entry(BIG, f"id{index}"), expire_seconds=60)


def test_size_limit_evicts_the_least_recently_used(tmp_path: Path) -> None:
    entries = DiskStore(tmp_path / "entries", size_limit=LIMIT)
    fill(entries, 15)
    assert entries.get("k0") is not None  # k0 is now the most recently used
    for index in range(3):
        assert entries.set(f"n{index}", make_entry(BIG), expire_seconds=60) == 0  # eviction waits for flush
    assert entries.volume().size_bytes > LIMIT
    assert entries.flush() >= 1  # diskcache evicts in batches of up to 10 entries
    assert entries.get("k0") is not None
    assert entries.get("k1") is None
    assert entries.volume().size_bytes <= LIMIT


def test_a_corrupt_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "entries").mkdir()
    (tmp_path / "entries" / "cache.db").write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(StoreError, match="cannot open the cache database"):
        open_store(tmp_path)


def test_an_unusable_directory_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    with pytest.raises(StoreError, match="cannot create the cache directory"):
        open_store(tmp_path / "file" / "cache")


def test_counters_survive_reopening_and_reset(tmp_path: Path) -> None:
    counters = DiskCounterStore(tmp_path / "counters")
    started = counters.started_at()
    counters.incr("hits|o|r|", 2)
    counters.incr_many({"hits|o|r|": 1, "misses|o|r|": 5})
    counters.close()
    again = DiskCounterStore(tmp_path / "counters")
    assert again.read_all() == {"hits|o|r|": 3, "misses|o|r|": 5}
    assert again.started_at() == started
    again.reset()
    assert again.read_all() == {}
    assert again.started_at() > started


def _add_many(directory: str) -> None:
    store = DiskCounterStore(Path(directory))
    for _ in range(200):
        store.incr_many({"hits|o|r|": 1, "requests|o|r|": 1})
    store.close()


def test_counter_increments_are_atomic_across_processes(tmp_path: Path) -> None:
    DiskCounterStore(tmp_path / "counters").close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(str(tmp_path / "counters"),)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert DiskCounterStore(tmp_path / "counters").read_all() == {"hits|o|r|": 600, "requests|o|r|": 600}


def test_partition_secret_is_created_once_and_kept(tmp_path: Path) -> None:
    first = load_partition_secret(tmp_path)
    assert len(first) == 32
    assert load_partition_secret(tmp_path) == first
    assert (tmp_path / "partition.key").stat().st_mode & 0o777 == 0o600
    assert list(tmp_path.glob("*.tmp")) == []


def test_reads_reach_the_eviction_order_of_other_processes_after_a_flush(tmp_path: Path) -> None:
    reader = DiskStore(tmp_path / "entries", size_limit=LIMIT)
    writer = DiskStore(tmp_path / "entries", size_limit=LIMIT)  # as another process would open it
    fill(writer, 15)
    assert reader.get("k0") is not None
    reader.flush()
    for index in range(3):
        writer.set(f"n{index}", make_entry(BIG), expire_seconds=60)
    assert writer.flush() >= 1
    assert writer.get("k0") is not None
    assert writer.get("k1") is None
