"""The storage interfaces shared by the cache (entries) and the statistics (counters).

A backend raises `StoreError` for every failure of the backing store (I/O error, read-only or full disk,
corrupt database, Redis down) and nothing else, so callers can keep serving without the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class StoreError(Exception):
    """Any failure of the backing store (I/O, corrupt database, full disk, Redis down)."""


@dataclass(frozen=True)
class Entry:
    """One stored response and where it came from."""

    status_code: int
    headers: tuple[tuple[str, str], ...]
    content: bytes
    stored_at: float  # epoch seconds
    upstream_seconds: float  # how long the upstream took to compute it
    model_version: str | None  # X-Model-Version of the response that computed it
    origin: str  # "http://127.0.0.1:8000"
    route: str  # cache rule label
    model: str | None
    method: str
    path: str  # path + query as requested
    key_id: str  # opaque short id (X-Cache-Key)
    size: int  # bytes of content + headers


class Volume(NamedTuple):
    entries: int
    size_bytes: int
    limit_bytes: int | None


class CacheStore(Protocol):
    """Stored responses by key. A backend may also have `flush() -> int`, which the cache addon calls
    every second off the event loop to write buffered bookkeeping and evict (it returns the number of
    entries removed), and `set_many_now(items) -> bool`, a write in one step that never waits (False,
    having stored nothing, where it would have to), for the event loop; see `DiskStore`."""

    def get(self, key: str) -> Entry | None:
        """The entry under `key`, or None; counts as a use for least-recently-used eviction."""
        ...

    def set(self, key: str, entry: Entry, expire_seconds: float) -> int:
        """Store `entry` for `expire_seconds`; returns how many entries this call evicted to make room
        (a backend may evict in `flush()` instead, when it has one)."""
        ...

    def delete(self, key: str) -> bool:
        """Remove the entry under `key`; whether there was one."""
        ...

    def iter_entries(self) -> Iterator[tuple[str, Entry]]:
        """Every (key, entry) stored, for `forward-proxy cache ls/show/purge`."""
        ...

    def volume(self) -> Volume: ...

    def close(self) -> None: ...


class CounterStore(Protocol):
    """Named integer counters, atomic across threads and processes that share the store."""

    def incr(self, name: str, amount: int = 1) -> None: ...

    def incr_many(self, amounts: dict[str, int]) -> None:
        """Add several amounts in one atomic step."""
        ...

    def read_all(self) -> dict[str, int]: ...

    def started_at(self) -> float:
        """Epoch seconds when counting started (set once, kept across restarts, renewed by reset)."""
        ...

    def reset(self) -> None: ...

    def close(self) -> None: ...
