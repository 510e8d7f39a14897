"""The Redis backend: entries, counters and the key secret in one Redis, shared by a fleet of proxies.

Every proxy process, on every host, that names the same URL shares one cache, one set of counters, one
key secret and one single-flight lock per key (`locks.py`). The URL forms:

    redis://[user:pass@]host:port/db              one server (db 0 when left out)
    rediss://[user:pass@]host:port/db             the same over TLS
    unix:///run/redis/redis.sock?db=0             a local socket
    redis+cluster://[user:pass@]host:port         Redis Cluster, found from any node (rediss+cluster:// TLS)
    redis+sentinel://[user:pass@]host:port[,host:port...]/service/db
                                                  the master that Sentinel names `service`
                                                  (rediss+sentinel:// for TLS)

Query parameters: `prefix` (of every key, default `fp:`, so several caches can share one Redis),
`retry_interval` (seconds a failed Redis is left alone before the next try, default 1), and redis-py's own
connection parameters (`socket_timeout`, `socket_connect_timeout`, `ssl_ca_certs`, `ssl_cert_reqs`,
`ssl_certfile`, `ssl_keyfile`, ...); for Sentinel also `sentinel_username` and `sentinel_password`.

Keys, all under the prefix:

    fp:entry:<cache key>    one stored answer, expiring with it (SET PX): Redis does the TTL
    fp:counters             every counter as one hash field (HINCRBY), and `meta:started_at` (HSETNX)
    fp:purge-generation     incremented by every delete, so memory tiers of other processes drop theirs
    fp:partition-secret     the secret of the key HMACs, created once (SET NX): the same for the fleet
    fp:lock:<cache key>     single-flight leases (`locks.py`)

Atomicity: a `get`, `set` or `delete` is one Redis command; `incr_many` and `reset` are one MULTI/EXEC
on the one counters hash, so every proxy's increments add up exactly. The size bound is Redis's own
`maxmemory` with an LRU or LFU `maxmemory-policy`; a warning is logged at the first contact with a server
that has none.

Failures: every Redis failure is a `StoreError`. Timeouts are short (connect 0.25 s, reply 0.5 s, one
immediate retry on a broken connection), and once Redis is found unreachable it is left alone for
`retry_interval` seconds: calls fail at once with `StoreError` instead of waiting on the network, and the
first call after the interval tries again. The outage is logged once when it starts and once when it ends.
Connections are made on first use, so opening the store never fails because Redis is down.

>>> target = parse_redis_url("redis://:secret@cache.internal:6380/2?prefix=team-a:")
>>> target.kind, target.prefix, target.display
('server', 'team-a:', 'redis://:***@cache.internal:6380/2?prefix=team-a:')
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.cluster
import redis.exceptions
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from forward_proxy.store.base import Entry, StoreError, Volume

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "fp:"
DEFAULT_RETRY_INTERVAL = 1.0
# Short enough that a dead Redis costs a request milliseconds; `socket_timeout` also bounds a hung server.
DEFAULT_CONNECTION: dict[str, Any] = {"socket_connect_timeout": 0.25, "socket_timeout": 0.5}
EVICTING_POLICIES = frozenset({"allkeys-lru", "volatile-lru", "allkeys-lfu", "volatile-lfu"})
SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel")
_OWN_PARAMETERS = ("prefix", "retry_interval")
_SENTINEL_PARAMETERS: dict[str, Callable[[str], Any]] = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "ssl_ca_certs": str,
    "ssl_cert_reqs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": lambda value: value.lower() in ("1", "true", "yes"),
    "sentinel_username": str,
    "sentinel_password": str,
}
# Failures that mean "Redis is not there" (left alone for retry_interval), as opposed to a refused command.
_OUTAGES: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
    OSError,
)
_FAILURES: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, *_OUTAGES)


def is_redis_url(text: str) -> bool:
    return text.split("://", 1)[0].lower() in SCHEMES and "://" in text


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `--cache-backend` Redis URL: what to connect to and how."""

    kind: Literal["server", "cluster", "sentinel"]
    url: str  # for redis-py (server, cluster): the URL without this module's own parameters
    display: str  # the URL with its password masked, for logs
    prefix: str = DEFAULT_PREFIX
    retry_interval: float = DEFAULT_RETRY_INTERVAL
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # sentinel: connection options from the query

    def connect(self) -> Any:
        """A redis-py client (Redis or RedisCluster); a cluster client contacts a node at once."""
        settings = {**DEFAULT_CONNECTION, "retry": Retry(NoBackoff(), 1)}
        if self.kind == "server":
            return redis.Redis.from_url(self.url, **settings)
        if self.kind == "cluster":
            return redis.cluster.RedisCluster.from_url(self.url, **settings)
        options = {**settings, **self.options}
        sentinel_settings = {
            name: options.pop(name) for name in ("sentinel_username", "sentinel_password") if name in options
        }
        sentinel_options = {k: v for k, v in options.items() if k.startswith(("socket_", "ssl"))}
        sentinel_options.update({key.removeprefix("sentinel_"): v for key, v in sentinel_settings.items()})
        sentinel = redis.sentinel.Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_options, **options)
        return sentinel.master_for(self.service, db=self.db)


def parse_redis_url(url: str) -> RedisTarget:
    """Check a Redis URL of any supported form; `ValueError` says what is wrong and what to write."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(
            f"{_mask(url)!r} is not a Redis URL: write redis://[user:pass@]host:port/db, rediss://..., "
            "unix:///path/redis.sock, redis+cluster://host:port or redis+sentinel://host:port/service/db"
        )
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {name: value for name, value in query if name in _OWN_PARAMETERS}
    rest = [(name, value) for name, value in query if name not in _OWN_PARAMETERS]
    prefix = own.get("prefix", DEFAULT_PREFIX)
    try:
        retry_interval = float(own.get("retry_interval", DEFAULT_RETRY_INTERVAL))
    except ValueError:
        raise ValueError(f"retry_interval={own['retry_interval']!r} is not a number of seconds") from None
    if retry_interval < 0:
        raise ValueError("retry_interval must be 0 or more seconds")
    display = _mask(url)
    common: dict[str, Any] = {"display": display, "prefix": prefix, "retry_interval": retry_interval}
    if scheme.endswith("+sentinel"):
        return _parse_sentinel(parts.netloc, parts.path, rest, scheme.startswith("rediss"), common)
    base_scheme = scheme.removesuffix("+cluster")
    plain = _join(base_scheme, parts.netloc, parts.path, urlencode(rest))
    try:
        redis.connection.parse_url(plain)  # checks ports and query parameters
    except ValueError as exc:
        raise ValueError(f"{display}: {exc}") from None
    if base_scheme != "unix" and not parts.hostname:
        raise ValueError(f"{display} names no host: write {base_scheme}://host:port/db")
    kind: Literal["server", "cluster"] = "cluster" if scheme.endswith("+cluster") else "server"
    return RedisTarget(kind, plain, **common)


def _parse_sentinel(
    netloc: str, path: str, query: list[tuple[str, str]], tls: bool, common: dict[str, Any]
) -> RedisTarget:
    example = "redis+sentinel://host:26379[,host:26379]/service/db"
    userinfo, _, hosts = netloc.rpartition("@")
    sentinels = []
    for address in filter(None, hosts.split(",")):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{common['display']}: sentinel {address!r} needs host:port, as in {example}")
        sentinels.append((host.strip("[]"), int(port)))
    segments = [unquote(segment) for segment in path.split("/") if segment]
    if not sentinels or not segments or len(segments) > 2:
        raise ValueError(f"{common['display']}: write {example}")
    if len(segments) == 2 and not segments[1].isdigit():
        raise ValueError(f"{common['display']}: the database {segments[1]!r} is not a number")
    options: dict[str, Any] = {}
    for name, value in query:
        parse = _SENTINEL_PARAMETERS.get(name)
        if parse is None:
            known = ", ".join(sorted(_SENTINEL_PARAMETERS))
            raise ValueError(f"{common['display']}: unknown parameter {name!r} (known: {known})")
        try:
            options[name] = parse(value)
        except ValueError:
            raise ValueError(f"{common['display']}: {name}={value!r} is not valid") from None
    if userinfo:
        username, _, password = userinfo.partition(":")
        if username:
            options["username"] = unquote(username)
        if password:
            options["password"] = unquote(password)
    if tls:
        options["ssl"] = True
    return RedisTarget(
        "sentinel",
        "",
        sentinels=tuple(sentinels),
        service=segments[0],
        db=int(segments[1]) if len(segments) == 2 else 0,
        options=options,
        **common,
    )


def _mask(url: str) -> str:
    """The URL with the password (and `*_password` query values) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = [
        (name, "***" if name.endswith("password") else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return _join(parts.scheme, netloc, parts.path, urlencode(query, safe="*:/,"))


def _join(scheme: str, netloc: str, path: str, query: str) -> str:
    """`urlunsplit` without its habit of dropping the `//` of an empty host (unix:///path)."""
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


class RedisConnection:
    """One redis-py client shared by a process's entry store, counters and locks.

    `run(what, operation)` calls `operation(client)` and turns every failure into `StoreError`. After an
    outage (connection refused, timeout, cluster down) calls fail at once for `retry_interval` seconds; the
    outage is logged when it starts and when it ends, not per call. Thread-safe: redis-py's pool hands each
    thread its own connection. Closed when the last user releases it.
    """

    def __init__(self, target: RedisTarget) -> None:
        self.target = target
        self._client: Any = None
        self._lock = threading.Lock()
        self._retry_at = 0.0  # monotonic time before which calls fail without trying
        self._down_since: float | None = None
        self._last_error = ""
        self._users = 1
        self._checked_server = False

    @property
    def available(self) -> bool:
        """False while an outage is known and its retry interval has not passed."""
        return time.monotonic() >= self._retry_at

    def run(self, what: str, operation: Callable[[Any], T]) -> T:
        now = time.monotonic()
        if now < self._retry_at:
            raise StoreError(
                f"{what}: Redis at {self.target.display} is unavailable ({self._last_error}); "
                f"next try in {self._retry_at - now:.1f}s"
            )
        try:
            client = self._connected()
            result = operation(client)
        except _OUTAGES as exc:
            self._failed(exc)
            raise StoreError(f"{what}: Redis at {self.target.display}: {_describe(exc)}") from exc
        except _FAILURES as exc:
            raise StoreError(f"{what}: Redis at {self.target.display} refused: {_describe(exc)}") from exc
        if self._down_since is not None or not self._checked_server:
            self._succeeded(client)
        return result

    def acquire(self) -> RedisConnection:
        with self._lock:
            self._users += 1
        return self

    def close(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._client is None:
                return
            client, self._client = self._client, None
        try:
            client.close()
        except Exception as exc:  # closing a pool to a dead server must not fail the shutdown
            logger.debug(f"closing the Redis client: {exc}")

    def _connected(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self.target.connect()
            return self._client

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._last_error = _describe(exc)
            self._retry_at = time.monotonic() + self.target.retry_interval
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
            if self.target.kind == "cluster":  # rediscover the nodes when it is back
                client, self._client = self._client, None
            else:
                client = None
        if client is not None:
            try:
                client.close()
            except Exception as close_error:
                logger.debug(f"closing the Redis cluster client: {close_error}")
        if first:
            logger.warning(
                f"Redis at {self.target.display} is unreachable ({self._last_error}): requests are forwarded "
                f"uncached and counts kept in memory until it is back (next try every "
                f"{self.target.retry_interval:g}s)"
            )

    def _succeeded(self, client: Any) -> None:
        with self._lock:
            down_since, self._down_since = self._down_since, None
            check, self._checked_server = not self._checked_server, True
        if down_since is not None:
            logger.warning(
                f"Redis at {self.target.display} is back after {time.monotonic() - down_since:.1f}s: "
                "caching again"
            )
        if check:
            warn_about_memory_settings(client, self.target.display)


def warn_about_memory_settings(client: Any, display: str) -> None:
    """Log a warning when the server has no `maxmemory` or a policy that does not evict LRU/LFU."""
    try:
        settings = client.config_get("maxmemory*")
    except _FAILURES as exc:
        logger.info(
            f"cannot read maxmemory of Redis at {display} ({_describe(exc)}); make sure it has maxmemory "
            "and maxmemory-policy volatile-lru (see docs/deployment.md)"
        )
        return
    # A cluster client may answer per node: {node: {name: value}}.
    answers = (
        list(settings.values())
        if settings and isinstance(next(iter(settings.values())), dict)
        else [settings]
    )
    for answer in answers:
        values = {_text(name): _text(value) for name, value in answer.items()}
        maxmemory, policy = values.get("maxmemory", "0"), values.get("maxmemory-policy", "")
        if maxmemory == "0":
            logger.warning(
                f"Redis at {display} has no maxmemory: entries leave only when they expire and Redis grows "
                "until the host runs out of memory. Set maxmemory (e.g. 2gb) and maxmemory-policy "
                "volatile-lru (see docs/deployment.md)."
            )
            return
        if policy not in EVICTING_POLICIES:
            logger.warning(
                f"Redis at {display} has maxmemory-policy {policy}: once it reaches maxmemory "
                + (
                    "every write fails and nothing new is cached"
                    if policy == "noeviction"
                    else "it evicts entries that are not the least used"
                )
                + ". Set maxmemory-policy volatile-lru (see docs/deployment.md)."
            )
            return


def memory_limit(client: Any) -> int | None:
    """The server's maxmemory in bytes, None when it has none or it cannot be read."""
    try:
        settings = client.config_get("maxmemory")
    except _FAILURES:
        return None
    if settings and isinstance(next(iter(settings.values())), dict):
        settings = next(iter(settings.values()))
    value = int(_text(settings.get("maxmemory", settings.get(b"maxmemory", "0"))) or 0)
    return value or None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


# --- entries ---------------------------------------------------------------------------------------

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


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


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
                yield _text(name)[start:], entry

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


# --- counters --------------------------------------------------------------------------------------

_STARTED_AT = "meta:started_at"


class RedisCounterStore:
    """Counters as fields of one Redis hash: HINCRBY is atomic for every proxy on every host."""

    def __init__(self, connection: RedisConnection) -> None:
        self.connection = connection
        self.key = f"{connection.target.prefix}counters"

    def incr(self, name: str, amount: int = 1) -> None:
        self.incr_many({name: amount})

    def incr_many(self, amounts: dict[str, int]) -> None:
        """All amounts in one MULTI/EXEC; the start time is set too if nobody has (HSETNX)."""

        def add(client: Any) -> None:
            pipeline = client.pipeline(transaction=True)
            for name, amount in amounts.items():
                pipeline.hincrby(self.key, name, amount)
            pipeline.hsetnx(self.key, _STARTED_AT, repr(time.time()))
            pipeline.execute()

        self.connection.run("counter write failed", add)

    def read_all(self) -> dict[str, int]:
        values = self.connection.run("counter read failed", lambda client: client.hgetall(self.key))
        counts = {}
        for name, value in values.items():
            text = _text(name)
            if not text.startswith("meta:"):
                counts[text] = int(value)
        return counts

    def started_at(self) -> float:
        def read(client: Any) -> float:
            pipeline = client.pipeline(transaction=True)
            pipeline.hsetnx(self.key, _STARTED_AT, repr(time.time()))
            pipeline.hget(self.key, _STARTED_AT)
            return float(pipeline.execute()[1])

        return self.connection.run("counter read failed", read)

    def reset(self) -> None:
        def clear(client: Any) -> None:
            pipeline = client.pipeline(transaction=True)
            pipeline.delete(self.key)
            pipeline.hset(self.key, _STARTED_AT, repr(time.time()))
            pipeline.execute()

        self.connection.run("counter reset failed", clear)

    def close(self) -> None:
        self.connection.close()


def open_redis(url: str | RedisTarget) -> tuple[RedisStore, RedisCounterStore]:
    """The entry store and the counter store of the Redis at `url`, sharing one connection pool.

    Raises `ValueError` for a URL that is not a Redis URL; never fails because Redis is down (the first
    calls do, with `StoreError`, until it is back).
    """
    target = url if isinstance(url, RedisTarget) else parse_redis_url(url)
    connection = RedisConnection(target)
    return RedisStore(connection), RedisCounterStore(connection.acquire())
