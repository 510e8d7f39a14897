"""One redis-py client per process, shared by the entry store, the counters and the leases, and what
happens when Redis fails.

Every Redis failure is a `StoreError`. Timeouts are short (connect 0.25 s, reply 0.5 s, one immediate
retry on a broken connection: `url.DEFAULT_CONNECTION`), and once Redis is found unreachable it is left
alone for `retry_interval` seconds: calls fail at once with `StoreError` instead of waiting on the network,
and the first call after the interval tries again. The outage is logged once when it starts and once when
it ends. Connections are made on first use, so opening a store never fails because Redis is down.

>>> from forward_proxy.store.redis.url import parse_redis_url
>>> connection = RedisConnection(parse_redis_url("redis://127.0.0.1:1/0?retry_interval=60"))  # nobody there
>>> connection.available
True
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis.exceptions

from forward_proxy.store.base import StoreError
from forward_proxy.store.redis.url import RedisTarget

logger = logging.getLogger(__name__)

T = TypeVar("T")

EVICTING_POLICIES = frozenset({"allkeys-lru", "volatile-lru", "allkeys-lfu", "volatile-lfu"})
# Failures that mean "Redis is not there" (left alone for retry_interval), as opposed to a refused command.
_OUTAGES: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
    OSError,
)
_FAILURES: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, *_OUTAGES)


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
            raise StoreError(f"{what}: Redis at {self.target.display}: {describe(exc)}") from exc
        except _FAILURES as exc:
            raise StoreError(f"{what}: Redis at {self.target.display} refused: {describe(exc)}") from exc
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
            self._last_error = describe(exc)
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
            f"cannot read maxmemory of Redis at {display} ({describe(exc)}); make sure it has maxmemory "
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
        values = {text(name): text(value) for name, value in answer.items()}
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
    value = int(text(settings.get("maxmemory", settings.get(b"maxmemory", "0"))) or 0)
    return value or None


def text(value: Any) -> str:
    """A Redis reply (bytes, or already text) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def describe(exc: BaseException) -> str:
    """A failure in one short sentence for logs and `StoreError`s."""
    message = str(exc) or type(exc).__name__
    return message if len(message) < 200 else message[:200] + "..."
