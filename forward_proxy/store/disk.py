"""The diskcache backend: entries and counters in two diskcache databases under the cache directory.

    <cache_dir>/entries/        responses, LRU-evicted beyond the size limit, each with an expiry
    <cache_dir>/counters/       the shared counters (never evicted)
    <cache_dir>/partition.key   the random secret for credential HMACs, created on first use

Every proxy process, `forward-proxy stats` and `forward-proxy cache` open the same files, so all of them
see one cache. diskcache runs each operation in an SQLite transaction: a `get`, `set` or `incr` is atomic
across threads and processes, and `incr_many` adds several counters in one transaction.

>>> import tempfile; from pathlib import Path
>>> entries, counters = open_store(Path(tempfile.mkdtemp()), size_limit=10 * 2**20)
>>> counters.incr("hits|http://127.0.0.1:8000|POST /v1/embeddings|", 2)
>>> counters.read_all()
{'hits|http://127.0.0.1:8000|POST /v1/embeddings|': 2}
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import diskcache

from forward_proxy.store.base import Entry, StoreError, Volume

T = TypeVar("T")
_STARTED_AT = "meta:started_at"


def _guarded(what: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except StoreError:
        raise
    except Exception as exc:  # any failure of the database or the disk is a store failure
        raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _open_cache(directory: Path, **settings: Any) -> diskcache.Cache:
    return _guarded(
        f"cannot open the cache database in {directory}", lambda: diskcache.Cache(str(directory), **settings)
    )


def checksum(entry: Entry) -> str:
    """A digest of what a client gets from `entry`, kept beside it (diskcache's tag column).

    SQLite notices a damaged page structure, but not damaged bytes inside a row or a value file: without
    this, a disk that flips bytes of a stored answer would have the proxy serve the altered answer.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((entry.status_code, entry.headers, entry.model_version, entry.key_id)).encode())
    digest.update(entry.content)
    return digest.hexdigest()


_SELECT_LIVE = (
    "SELECT mode, filename, value, tag FROM Cache"
    " WHERE key = ? AND raw = ? AND (expire_time IS NULL OR expire_time > ?)"
)
_TOUCH = "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = ?"


class DiskStore:
    """Responses in a diskcache.Cache, evicting the least recently used beyond `size_limit` bytes.

    diskcache's own least-recently-used `get` writes the access time in a transaction of its own, which
    costs more than the whole rest of a cache hit, and its `set` culls in the same call. Here a read is a
    plain SELECT (diskcache's own fast path for other policies), a write is one transaction, and `flush()`
    (the cache addon calls it every second, off the event loop) writes the batched access times, then
    removes expired entries and evicts the least recently used beyond the size limit. So the cache may
    exceed its limit for up to a second, and the eviction order is at most a second old.

    `set_many_now` is the write for the event loop: every item in one transaction when the database's
    write lock is free at once, never waiting for it (another process may hold it) and never
    checkpointing the write-ahead log there (`flush` checkpoints, off the loop).
    """

    def __init__(self, directory: Path, size_limit: int | None = None) -> None:
        settings: dict[str, Any] = {"eviction_policy": "least-recently-used", "cull_limit": 0}
        if size_limit is not None:
            settings["size_limit"] = size_limit
        self.directory = directory
        self._cache = _open_cache(directory, **settings)
        # `set_many_now`'s own: a read on the same connection as the writes would trust what that
        # connection cached, and stop noticing a database file damaged under it.
        self._writer = _open_cache(directory, **settings)
        self._writer_connection: Any = None  # the one whose lock and checkpoint settings are set
        self._touched: dict[str, float] = {}
        self._touched_lock = threading.Lock()

    def get(self, key: str) -> Entry | None:
        def read() -> Any:
            cache = self._cache
            db_key, raw = cache._disk.put(key)
            rows = cache._sql(_SELECT_LIVE, (db_key, raw, time.time())).fetchall()
            if not rows:
                return None
            mode, filename, value, tag = rows[0]
            try:
                return cache._disk.fetch(mode, filename, value, False), tag
            except OSError:
                return None  # removed (evicted, purged) between the SELECT and reading its file

        found = _guarded("cache read failed", read)
        if found is None:
            return None
        value, tag = found
        if not isinstance(value, Entry):
            raise StoreError(f"cache read failed: {key!r} holds a {type(value).__name__}, not an entry")
        if tag is not None and tag != checksum(value):  # entries of older versions have no checksum
            raise StoreError(f"cache read failed: entry {value.key_id} is damaged (its checksum differs)")
        with self._touched_lock:
            self._touched[key] = time.time()
        return value

    def set(self, key: str, entry: Entry, expire_seconds: float) -> int:
        """Store `entry`; evicting to the size limit is left to `flush()`, so this returns 0."""
        _guarded(
            "cache write failed",
            lambda: self._cache.set(key, entry, expire=expire_seconds, tag=checksum(entry)),
        )
        return 0

    def set_many_now(self, items: Sequence[tuple[str, Entry, float]]) -> bool:
        """Store every (key, entry, expire seconds) item in one transaction, if the write lock can be
        taken without waiting; False, having stored nothing, when another connection holds it (`set`
        waits for it). Evicts nothing, like `set`."""

        def write() -> bool:
            cache = self._writer
            connection = cache._con  # this thread's connection of the writer's own cache
            if connection is not self._writer_connection:  # used by nothing else: set once
                connection.execute("PRAGMA busy_timeout = 0")
                connection.execute("PRAGMA wal_autocheckpoint = 0")  # no fsync here: `flush` checkpoints
                self._writer_connection = connection
            try:
                with cache.transact():
                    for key, entry, expire_seconds in items:
                        cache.set(key, entry, expire=expire_seconds, tag=checksum(entry))
            except diskcache.Timeout:
                return False
            return True

        return _guarded("cache write failed", write)

    def flush(self) -> int:
        """Write the access times read since the last flush, remove expired entries and evict the least
        recently used beyond the size limit, then checkpoint the write-ahead log (what `set_many_now`
        leaves to it); returns how many entries were removed."""

        def write_and_cull() -> int:
            self._write_access_times()
            removed = int(self._cache.cull())
            self._cache._sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            return removed

        return _guarded("cache flush failed", write_and_cull)

    def _write_access_times(self) -> None:
        with self._touched_lock:
            touched, self._touched = self._touched, {}
        if not touched:
            return
        rows = []
        for key, when in touched.items():
            db_key, raw = self._cache._disk.put(key)
            rows.append((when, db_key, raw))
        with self._cache.transact():
            self._cache._con.executemany(_TOUCH, rows)

    def delete(self, key: str) -> bool:
        return bool(_guarded("cache delete failed", lambda: self._cache.delete(key)))

    def iter_entries(self) -> Iterator[tuple[str, Entry]]:
        keys = _guarded("cache listing failed", lambda: list(self._cache.iterkeys()))
        for key in keys:
            entry = _guarded("cache read failed", partial(self._cache.get, key))
            if isinstance(entry, Entry):
                yield key, entry

    def volume(self) -> Volume:
        return _guarded(
            "cache volume failed",
            lambda: Volume(len(self._cache), int(self._cache.volume()), int(self._cache.size_limit)),
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._write_access_times()
        with contextlib.suppress(Exception):
            self._cache.close()
        with contextlib.suppress(Exception):
            self._writer.close()


class DiskCounterStore:
    """Counters in a diskcache.Cache that never evicts; `incr` is atomic across processes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache = _open_cache(directory, eviction_policy="none")
        _guarded("counter start time failed", lambda: self._cache.add(_STARTED_AT, time.time()))

    def incr(self, name: str, amount: int = 1) -> None:
        _guarded("counter write failed", lambda: self._cache.incr(name, amount))

    def incr_many(self, amounts: dict[str, int]) -> None:
        def add_all() -> None:
            with self._cache.transact():
                for name, amount in amounts.items():
                    self._cache.incr(name, amount)

        _guarded("counter write failed", add_all)

    def read_all(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            counts = {}
            for key in self._cache.iterkeys():
                if isinstance(key, str) and not key.startswith("meta:"):
                    value = self._cache.get(key)
                    if isinstance(value, int):
                        counts[key] = value
            return counts

        return _guarded("counter read failed", read)

    def started_at(self) -> float:
        value = _guarded("counter read failed", lambda: self._cache.get(_STARTED_AT))
        if value is None:  # reset by another process between add and get
            _guarded("counter start time failed", lambda: self._cache.add(_STARTED_AT, time.time()))
            value = _guarded("counter read failed", lambda: self._cache.get(_STARTED_AT))
        return float(value)

    def reset(self) -> None:
        def clear() -> None:
            with self._cache.transact():
                self._cache.clear()
                self._cache.set(_STARTED_AT, time.time())

        _guarded("counter reset failed", clear)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._cache.close()


def open_store(cache_dir: Path, size_limit: int | None = None) -> tuple[DiskStore, DiskCounterStore]:
    """The entry store and the counter store of `cache_dir` (created if missing).

    `size_limit` (bytes) is saved in the database; None keeps the limit it was last opened with, which is
    what read-only users (`forward-proxy stats`, `forward-proxy cache`) should pass.
    Raises `StoreError` when the directory cannot be used.
    """
    _guarded(
        f"cannot create the cache directory {cache_dir}", lambda: cache_dir.mkdir(parents=True, exist_ok=True)
    )
    entries = DiskStore(cache_dir / "entries", size_limit)
    try:
        counters = DiskCounterStore(cache_dir / "counters")
    except StoreError:
        entries.close()
        raise
    return entries, counters


def load_partition_secret(cache_dir: Path) -> bytes:
    """The secret in `<cache_dir>/partition.key`, created (mode 0600) with 32 random bytes if missing.

    Every process on the cache directory reads the same secret, so their keys agree across restarts.
    """
    path = cache_dir / "partition.key"

    def read_or_create() -> bytes:
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes()
        cache_dir.mkdir(parents=True, exist_ok=True)
        candidate = path.with_name(f"partition.key.{os.getpid()}.tmp")
        candidate.write_bytes(secrets.token_bytes(32))
        os.chmod(candidate, 0o600)
        with contextlib.suppress(FileExistsError):
            os.link(candidate, path)  # first writer wins; everyone then reads the winner's secret
        candidate.unlink()
        return path.read_bytes()

    secret = _guarded(f"cannot read or create {path}", read_or_create)
    if len(secret) < 16:
        raise StoreError(f"{path} holds {len(secret)} bytes; delete it so a new secret is made")
    return secret
