"""Cache entries in Redis: one string per entry under `<prefix>entry:<cache key>`, expiring with it.

Redis does the TTL (SET PX) and, with an LRU or LFU `maxmemory-policy`, the size bound. A `get`, `set` or
`delete` is one Redis command (a delete also moves `<prefix>purge-generation`, so the memory tiers of
other processes drop their copies). `<prefix>partition-secret` holds the secret of the key HMACs, created
once (SET NX) and so the same for the whole fleet.

An entry is stored as bytes this module writes and reads itself, never pickled, so nothing in Redis can
run code in the proxy:

>>> from forward_proxy.store.base import Entry
>>> entry = Entry(200, (("content-type", "application/json"),), b'{"data": []}', 1.0, 0.25, "v1",
...               "http://127.0.0.1:8000", "POST /v1/embeddings", "minilm", "POST", "/v1/embeddings", "k1", 72)
>>> decode_entry(encode_entry(entry)) == entry
True
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Iterator
from typing import Any

from forward_proxy.store.base import Entry, StoreError, Volume
from forward_proxy.store.redis.connection import RedisConnection, memory_limit, text

logger = logging.getLogger(__name__)

_MAGIC = b"FPE1"  # format tag of a stored entry: magic, 4-byte metadata length, JSON metadata, content


def encode_entry(entry: Entry) -> bytes:
    """An entry as bytes: no pickle, so nothing in Redis can run code in the proxy."""
    meta = {
        "status_code": entry.status_code,
        "headers": [list(pair) for pair in entry.headers],
        "stored_at": entry.stored_at,
        "upstream_seconds": entry.upstream_seconds,
        "model_version": entry.model_version,
        "origin": entry.origin,
        "route": entry.route,
        "model": entry.model,
        "method": entry.method,
        "path": entry.path,
        "key_id": entry.key_id,
        "size": entry.size,
    }
    header = json.dumps(meta, separators=(",", ":")).encode()
    return _MAGIC + len(header).to_bytes(4, "big") + header + entry.content


def decode_entry(data: bytes) -> Entry:
    """The entry `encode_entry` wrote; `StoreError` for anything else."""
    if not data.startswith(_MAGIC) or len(data) < 8:
        raise StoreError("cache read failed: the Redis value is not an entry of this proxy")
    length = int.from_bytes(data[4:8], "big")
    try:
        meta = json.loads(data[8 : 8 + length])
        return Entry(
            status_code=int(meta["status_code"]),
            headers=tuple((str(name), str(value)) for name, value in meta["headers"]),
            content=bytes(data[8 + length :]),
            stored_at=float(meta["stored_at"]),
            upstream_seconds=float(meta["upstream_seconds"]),
            model_version=meta["model_version"],
            origin=meta["origin"],
            route=meta["route"],
            model=meta["model"],
            method=meta["method"],
            path=meta["path"],
            key_id=meta["key_id"],
            size=int(meta["size"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"cache read failed: a damaged entry in Redis ({exc})") from exc


def _glob_escape(pattern: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in pattern)


class RedisStore:
    """Entries as Redis strings with a TTL; Redis's maxmemory policy evicts the least recently used.

    `volume()` counts the entries under the prefix with SCAN (it is remembered for `volume_seconds`, so a
    dashboard polling it does not scan a large cache over and over). `set` returns 0: Redis evicts on its
    own, and its `INFO stats` `evicted_keys` counts it.
    """

    def __init__(self, connection: RedisConnection, *, volume_seconds: float = 5.0) -> None:
        self.connection = connection
        self.prefix = connection.target.prefix
        self.volume_seconds = volume_seconds
        self._volume: tuple[float, Volume] | None = None

    def entry_key(self, key: str) -> str:
        return f"{self.prefix}entry:{key}"

    @property
    def generation_key(self) -> str:
        return f"{self.prefix}purge-generation"

    def get(self, key: str) -> Entry | None:
        data = self.connection.run("cache read failed", lambda client: client.get(self.entry_key(key)))
        return None if data is None else decode_entry(data)

    def set(self, key: str, entry: Entry, expire_seconds: float) -> int:
        milliseconds = max(1, math.ceil(expire_seconds * 1000))
        value = encode_entry(entry)
        self.connection.run(
            "cache write failed", lambda client: client.set(self.entry_key(key), value, px=milliseconds)
        )
        return 0

    def delete(self, key: str) -> bool:
        """Remove the entry and move the purge generation on (memory tiers everywhere drop what they hold)."""

        def remove(client: Any) -> int:
            pipeline = client.pipeline(transaction=False)
            pipeline.delete(self.entry_key(key))
            pipeline.incr(self.generation_key)
            removed, _ = pipeline.execute()
            return int(removed)

        return self.connection.run("cache delete failed", remove) > 0

    def purge_generation(self) -> int:
        """A number that changes whenever any process deletes an entry."""
        value = self.connection.run("cache read failed", lambda client: client.get(self.generation_key))
        return int(value or 0)

    def partition_secret(self) -> bytes:
        """The fleet's secret for key HMACs, created (32 random bytes) by the first proxy that asks."""
        name = f"{self.prefix}partition-secret"

        def read_or_create(client: Any) -> bytes:
            client.set(name, secrets.token_bytes(32), nx=True)
            return bytes(client.get(name) or b"")

        secret = self.connection.run("cannot read the partition secret", read_or_create)
        if len(secret) < 16:
            raise StoreError(f"{name} in Redis holds {len(secret)} bytes; delete it so a new secret is made")
        return secret

    def _entry_keys(self, client: Any) -> Iterator[bytes]:
        yield from client.scan_iter(match=_glob_escape(self.prefix) + "entry:*", count=1000)

    def iter_entries(self) -> Iterator[tuple[str, Entry]]:
        keys = self.connection.run("cache listing failed", lambda client: list(self._entry_keys(client)))
        start = len(self.prefix) + len("entry:")
        for offset in range(0, len(keys), 200):
            batch = keys[offset : offset + 200]

            def fetch(client: Any, batch: list[bytes] = batch) -> list[bytes | None]:
                pipeline = client.pipeline(transaction=False)
                for name in batch:
                    pipeline.get(name)
                return list(pipeline.execute())

            for name, data in zip(batch, self.connection.run("cache read failed", fetch), strict=True):
                if data is None:  # expired or evicted since the scan
                    continue
                try:
                    entry = decode_entry(data)
                except StoreError as exc:
                    logger.warning(f"skipping {name!r}: {exc}")
                    continue
                yield text(name)[start:], entry

    def volume(self) -> Volume:
        now = time.monotonic()
        if self._volume is not None and now - self._volume[0] < self.volume_seconds:
            return self._volume[1]

        def measure(client: Any) -> Volume:
            entries = size = 0
            batch: list[bytes] = []

            def add_sizes() -> int:
                pipeline = client.pipeline(transaction=False)
                for name in batch:
                    pipeline.strlen(name)
                return sum(int(length) for length in pipeline.execute())

            for name in self._entry_keys(client):
                batch.append(name)
                if len(batch) == 500:
                    entries, size, batch = entries + len(batch), size + add_sizes(), []
            if batch:
                entries, size = entries + len(batch), size + add_sizes()
            return Volume(entries, size, memory_limit(client))

        volume = self.connection.run("cache volume failed", measure)
        self._volume = (now, volume)
        return volume

    def flush(self) -> int:
        """Nothing to write or evict here: Redis keeps the access times and evicts by itself."""
        return 0

    def close(self) -> None:
        self.connection.close()
