"""Single flight across processes and hosts: one upstream call per key for a whole fleet of proxies.

Each proxy first coalesces identical requests in its own process (`cache/singleflight.py`); the one
computation it would then start asks Redis for the key's lease first:

    SET <prefix>lock:<cache key> <random token> NX PX <lease>

- The proxy that gets the lease LEADS: it calls the upstream, stores the answer, then releases the lease.
  While the call runs it renews the lease every `lease / 3` seconds, so a long upstream call keeps it,
  while the lease of a leader that crashed lapses within `lease` seconds.
- Every other proxy FOLLOWS: it polls the store for the answer (every 10 ms at first, then up to every
  100 ms) and serves it once it lands. When the lease is gone without an answer (the leader crashed), the
  followers race for the lease again, and one of them leads.
- A follower goes upstream ALONE when the leader's answer could not be stored (the leader then replaces
  its lease by a short "not shared" mark, so followers learn it at their next poll instead of waiting), when
  it has waited `wait` seconds in all, or when Redis fails (a Redis outage never holds a request up).

Renewal and release are compare-and-set Lua scripts on the token, so a proxy only ever extends or removes
its own lease. Redis calls run in the store's worker threads (`aio.in_store_thread`): a slow Redis never
blocks the proxy's event loop, nor the threads that resolve names.

>>> import asyncio
>>> from forward_proxy.store.redis import RedisConnection, parse_redis_url
>>> flight = FleetFlight(RedisConnection(parse_redis_url("redis://127.0.0.1:1/0")))  # nothing listens there
>>> async def compute():
...     return "answer"
>>> async def publish(value):
...     return True
>>> asyncio.run(flight.run("key", compute, publish, lambda: None, wait=1.0))  # Redis down: goes alone
('answer', <Turn.ALONE: 'alone'>)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from forward_proxy.store.aio import in_store_thread
from forward_proxy.store.base import StoreError
from forward_proxy.store.redis import RedisConnection

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_LEASE = 5.0
FIRST_POLL = 0.01
LONGEST_POLL = 0.1
NOT_SHARED = b"~not-shared"  # the lease's value once its leader's answer could not be stored
NOT_SHARED_SECONDS = 1.0

# KEYS[1] lease; ARGV[1] token, ARGV[2] milliseconds
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lease; ARGV[1] token, ARGV[2] "1" when the answer was stored, ARGV[3] mark, ARGV[4] milliseconds
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '1' then
    return redis.call('del', KEYS[1])
  end
  redis.call('set', KEYS[1], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
"""


class Turn(enum.Enum):
    LEADER = "leader"  # held the lease and called the upstream for the fleet
    FOLLOWER = "follower"  # served the answer another proxy's leader stored
    ALONE = "alone"  # called the upstream itself: answer not shareable, waited too long, or Redis failed


@dataclass(frozen=True)
class Lease:
    name: str
    token: bytes


@dataclass
class Held:
    """A lease this proxy holds while it computes, renewed until released."""

    lease: Lease
    renewal: asyncio.Task[None]


class FleetFlight(Generic[T]):
    """Leases in the Redis of `connection`; `lease` seconds is how long a crashed leader can hold one."""

    def __init__(self, connection: RedisConnection, *, lease: float = DEFAULT_LEASE) -> None:
        if lease <= 0:
            raise ValueError("the lease must be more than 0 seconds")
        self.connection = connection
        self.lease = lease
        self.prefix = connection.target.prefix

    def lease_name(self, key: str) -> str:
        return f"{self.prefix}lock:{key}"

    async def run(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        publish: Callable[[T], Awaitable[bool]],
        lookup: Callable[[], T | None],
        *,
        wait: float,
    ) -> tuple[T, Turn]:
        """The answer for `key` and how it was got.

        `compute()` calls the upstream; `publish(value)` stores its answer and says whether others can now
        find it with their `lookup()` (a blocking store read, run in a thread; it may raise `StoreError`).
        Raises what `compute` or `publish` raise; never a Redis failure.
        """
        held, value = await self.take(key, lookup, wait=wait)
        if value is not None:
            return value, Turn.FOLLOWER
        shared = False
        try:
            value = await compute()
            shared = await publish(value)
            return value, Turn.LEADER if held is not None else Turn.ALONE
        finally:
            if held is not None:
                await self.release(held, shared)

    async def take(
        self, key: str, lookup: Callable[[], T | None], *, wait: float
    ) -> tuple[Held | None, T | None]:
        """Who computes `key` in the fleet: `(held, None)` this proxy, under a lease it must `release`;
        `(None, value)` another proxy did, and stored `value`; `(None, None)` this proxy, alone (the
        other's answer could not be shared, it took longer than `wait` seconds, or Redis failed)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                lease = await self._acquire(key)
            except StoreError:
                return None, None
            if lease is not None:
                return Held(lease, asyncio.ensure_future(self._renew_forever(lease))), None
            value, retry = await self._follow(key, lookup, deadline)
            if value is not None or not retry:
                return None, value

    async def release(self, held: Held, shared: bool) -> None:
        """Give the lease up; `shared`: the answer is stored for the others to find."""
        held.renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held.renewal
        await self._release(held.lease, shared)

    async def _follow(
        self, key: str, lookup: Callable[[], T | None], deadline: float
    ) -> tuple[T | None, bool]:
        """(the published answer, _) or (None, whether to race for the lease again)."""
        pause = FIRST_POLL
        name = self.lease_name(key)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.info(f"waited for another proxy's answer for {key[:24]} too long; asking the upstream")
                return None, False
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, LONGEST_POLL)
            try:
                value = await in_store_thread(lookup)
                if value is not None:
                    return value, False
                holder = await in_store_thread(self.connection.run, "lease read failed", _getter(name))
            except StoreError:
                return None, False
            if holder == NOT_SHARED:
                return None, False
            if holder is None:
                # Released or lapsed: the answer may have landed just before the release; else lead anew.
                try:
                    value = await in_store_thread(lookup)
                except StoreError:
                    return None, False
                return value, value is None

    async def _acquire(self, key: str) -> Lease | None:
        lease = Lease(self.lease_name(key), secrets.token_hex(16).encode())
        milliseconds = _milliseconds(self.lease)

        def take(client: Any) -> bool:
            return bool(client.set(lease.name, lease.token, nx=True, px=milliseconds))

        taken = await in_store_thread(self.connection.run, "lease failed", take)
        return lease if taken else None

    async def _renew_forever(self, lease: Lease) -> None:
        milliseconds = _milliseconds(self.lease)
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await in_store_thread(
                    self.connection.run,
                    "lease renewal failed",
                    lambda client: client.eval(_RENEW, 1, lease.name, lease.token, milliseconds),
                )
            except StoreError as exc:  # the upstream call goes on; at worst a follower leads as well
                logger.debug(f"{exc}")

    async def _release(self, lease: Lease, shared: bool) -> None:
        mark = _milliseconds(NOT_SHARED_SECONDS)

        def release(client: Any) -> Any:
            return client.eval(_RELEASE, 1, lease.name, lease.token, "1" if shared else "0", NOT_SHARED, mark)

        try:
            await in_store_thread(self.connection.run, "lease release failed", release)
        except StoreError as exc:  # the lease lapses on its own within `lease` seconds
            logger.debug(f"{exc}")


def _getter(name: str) -> Callable[[Any], bytes | None]:
    return lambda client: client.get(name)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))
