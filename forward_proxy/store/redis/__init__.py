"""The Redis backend: entries, counters and the key secret in one Redis, shared by a fleet of proxies.

Every proxy process, on every host, that names the same URL shares one cache, one set of counters, one
key secret and one single-flight lock per key (`forward_proxy/store/locks.py`). One module per concept:

    url.py          the `--cache-backend` URL forms, their parsing and masking, the redis-py client they name
    connection.py   the one client a process shares, short timeouts, an outage left alone for retry_interval
    entries.py      `RedisStore`: one string per entry with its TTL, the purge generation, the key secret
    counters.py     `RedisCounterStore`: every counter one field of one hash

Keys, all under the prefix (`fp:` unless the URL's `prefix` says otherwise):

    fp:entry:<cache key>    one stored answer, expiring with it (SET PX): Redis does the TTL
    fp:counters             every counter as one hash field (HINCRBY), and `meta:started_at` (HSETNX)
    fp:purge-generation     incremented by every delete, so memory tiers of other processes drop theirs
    fp:partition-secret     the secret of the key HMACs, created once (SET NX): the same for the fleet
    fp:lock:<cache key>     single-flight leases (`locks.py`)

Atomicity: a `get`, `set` or `delete` is one Redis command; `incr_many` and `reset` are one MULTI/EXEC
on the one counters hash, so every proxy's increments add up exactly. The size bound is Redis's own
`maxmemory` with an LRU or LFU `maxmemory-policy`; a warning is logged at the first contact with a server
that has none. Every failure is a `StoreError`, fast once an outage is known (`connection.py`).

>>> target = parse_redis_url("redis://:secret@cache.internal:6380/2?prefix=team-a:")
>>> target.kind, target.prefix, target.display
('server', 'team-a:', 'redis://:***@cache.internal:6380/2?prefix=team-a:')
"""

from __future__ import annotations

from forward_proxy.store.redis.connection import RedisConnection, memory_limit, warn_about_memory_settings
from forward_proxy.store.redis.counters import RedisCounterStore
from forward_proxy.store.redis.entries import RedisStore, decode_entry, encode_entry
from forward_proxy.store.redis.url import (
    DEFAULT_CONNECTION,
    DEFAULT_PREFIX,
    DEFAULT_RETRY_INTERVAL,
    SCHEMES,
    RedisTarget,
    is_redis_url,
    parse_redis_url,
)

__all__ = [
    "DEFAULT_CONNECTION",
    "DEFAULT_PREFIX",
    "DEFAULT_RETRY_INTERVAL",
    "SCHEMES",
    "RedisConnection",
    "RedisCounterStore",
    "RedisStore",
    "RedisTarget",
    "decode_entry",
    "encode_entry",
    "is_redis_url",
    "memory_limit",
    "open_redis",
    "parse_redis_url",
    "warn_about_memory_settings",
]


def open_redis(url: str | RedisTarget) -> tuple[RedisStore, RedisCounterStore]:
    """The entry store and the counter store of the Redis at `url`, sharing one connection pool.

    Raises `ValueError` for a URL that is not a Redis URL; never fails because Redis is down (the first
    calls do, with `StoreError`, until it is back).
    """
    target = url if isinstance(url, RedisTarget) else parse_redis_url(url)
    connection = RedisConnection(target)
    return RedisStore(connection), RedisCounterStore(connection.acquire())
