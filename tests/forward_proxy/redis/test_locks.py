"""Single flight across proxies: one upstream call per key through a real Redis, bounded waits, crashed
leaders, answers that cannot be shared, and a Redis that is gone.

Each `Proxy` below stands for one proxy process: its own connection (pool) and its own `FleetFlight`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from forward_proxy.store.base import Entry, StoreError
from forward_proxy.store.locks import NOT_SHARED, FleetFlight, Turn
from forward_proxy.store.redis import RedisConnection, RedisStore, parse_redis_url
from tests.forward_proxy.redis.conftest import make_entry
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

T = TypeVar("T")


@dataclass
class Upstream:
    delay: float = 0.2
    calls: int = 0
    storable: bool = True

    async def compute(self) -> Entry:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return make_entry(f'{{"call": {self.calls}}}'.encode())


@dataclass
class Proxy:
    url: str
    lease: float = 5.0
    store: RedisStore = field(init=False)
    flight: FleetFlight[Entry] = field(init=False)

    def __post_init__(self) -> None:
        connection = RedisConnection(parse_redis_url(self.url))
        self.store = RedisStore(connection)
        self.flight = FleetFlight(connection, lease=self.lease)

    async def ask(self, key: str, upstream: Upstream, wait: float = 10.0) -> tuple[Entry, Turn]:
        async def publish(entry: Entry) -> bool:
            if not upstream.storable:
                return False
            try:  # as the cache addon does: a failed write is counted, never raised
                await asyncio.to_thread(self.store.set, key, entry, 60)
            except StoreError:
                return False
            return True

        return await self.flight.run(key, upstream.compute, publish, lambda: self.store.get(key), wait=wait)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def test_32_identical_requests_across_two_proxies_make_one_upstream_call(redis_server: RedisServer) -> None:
    a, b = Proxy(redis_server.url), Proxy(redis_server.url)
    upstream = Upstream()

    async def scenario() -> list[tuple[Entry, Turn]]:
        return await asyncio.gather(*((a if i % 2 else b).ask("k", upstream) for i in range(32)))

    results = run(scenario())
    assert upstream.calls == 1
    assert {entry.content for entry, _ in results} == {b'{"call": 1}'}
    turns = [turn for _, turn in results]
    assert turns.count(Turn.LEADER) == 1 and turns.count(Turn.FOLLOWER) == 31
    assert redis_server.command("EXISTS", "fp:lock:k") == b":0\r\n"  # released once stored


def test_different_keys_do_not_wait_for_each_other(redis_server: RedisServer) -> None:
    a = Proxy(redis_server.url)
    upstream = Upstream(delay=0.3)

    async def scenario() -> float:
        started = time.monotonic()
        await asyncio.gather(a.ask("k1", upstream), a.ask("k2", upstream), a.ask("k3", upstream))
        return time.monotonic() - started

    elapsed = run(scenario())
    assert upstream.calls == 3
    assert elapsed < 0.3 * 2


def test_a_crashed_leader_blocks_followers_no_longer_than_its_lease(redis_server: RedisServer) -> None:
    # A leader that took the lease and died: nobody renews or releases it.
    redis_server.command("SET", "fp:lock:k", "dead-leader-token", "PX", "600")
    b = Proxy(redis_server.url)
    upstream = Upstream(delay=0.05)

    async def scenario() -> tuple[list[tuple[Entry, Turn]], float]:
        started = time.monotonic()
        results = await asyncio.gather(*(b.ask("k", upstream, wait=10.0) for _ in range(4)))
        return results, time.monotonic() - started

    results, elapsed = run(scenario())
    assert upstream.calls == 1  # one follower took the lapsed lease; the others followed it
    assert sorted(turn.value for _, turn in results) == ["follower", "follower", "follower", "leader"]
    assert 0.5 < elapsed < 3.0


def test_a_long_upstream_call_keeps_its_lease(redis_server: RedisServer) -> None:
    a, b = Proxy(redis_server.url, lease=0.3), Proxy(redis_server.url, lease=0.3)
    upstream = Upstream(delay=1.0)  # more than three leases

    async def scenario() -> list[tuple[Entry, Turn]]:
        first = asyncio.ensure_future(a.ask("k", upstream))
        await asyncio.sleep(0.1)
        return list(await asyncio.gather(first, b.ask("k", upstream)))

    results = run(scenario())
    assert upstream.calls == 1
    assert [turn for _, turn in results] == [Turn.LEADER, Turn.FOLLOWER]


def test_followers_give_up_after_the_wait_bound(redis_server: RedisServer) -> None:
    a, b = Proxy(redis_server.url), Proxy(redis_server.url)
    slow, impatient = Upstream(delay=1.5), Upstream(delay=0.0)

    async def scenario() -> tuple[tuple[Entry, Turn], float]:
        leader = asyncio.ensure_future(a.ask("k", slow))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        follower = await b.ask("k", impatient, wait=0.3)
        elapsed = time.monotonic() - started
        await leader
        return follower, elapsed

    (_, turn), elapsed = run(scenario())
    assert turn is Turn.ALONE and impatient.calls == 1
    assert 0.3 <= elapsed < 1.0


def test_an_answer_that_is_not_stored_sends_followers_upstream_at_once(redis_server: RedisServer) -> None:
    a, b = Proxy(redis_server.url), Proxy(redis_server.url)
    upstream = Upstream(delay=0.2, storable=False)

    async def scenario() -> tuple[list[tuple[Entry, Turn]], float]:
        started = time.monotonic()
        leader = asyncio.ensure_future(a.ask("k", upstream))
        await asyncio.sleep(0.05)
        followers = await asyncio.gather(b.ask("k", upstream, wait=10), b.ask("k", upstream, wait=10))
        return [await leader, *followers], time.monotonic() - started

    results, elapsed = run(scenario())
    assert [turn for _, turn in results] == [Turn.LEADER, Turn.ALONE, Turn.ALONE]
    assert upstream.calls == 3
    assert elapsed < 1.5  # they learnt it at their next poll, not after the 10 s bound
    assert (
        redis_server.command("GET", "fp:lock:k")
        == b"$" + str(len(NOT_SHARED)).encode() + b"\r\n" + NOT_SHARED + b"\r\n"
    )


def test_a_failing_leader_marks_its_lease_not_shared(redis_server: RedisServer) -> None:
    a = Proxy(redis_server.url)

    async def failing() -> Entry:
        raise RuntimeError("upstream exploded")

    async def publish(entry: Entry) -> bool:
        return True

    with pytest.raises(RuntimeError):
        run(a.flight.run("k", failing, publish, lambda: None, wait=1))
    assert NOT_SHARED in redis_server.command("GET", "fp:lock:k")


def test_redis_down_means_everyone_goes_alone_without_waiting(redis_server: RedisServer) -> None:
    a = Proxy(redis_server.url)
    redis_server.stop()
    upstream = Upstream(delay=0.0)

    async def scenario() -> list[tuple[Entry, Turn]]:
        return await asyncio.gather(*(a.ask("k", upstream) for _ in range(5)))

    results = run(scenario())
    assert {turn for _, turn in results} == {Turn.ALONE}
    assert upstream.calls == 5


def test_redis_going_away_while_followers_wait(redis_server: RedisServer) -> None:
    a, b = Proxy(redis_server.url), Proxy(redis_server.url)
    upstream = Upstream(delay=0.5)

    async def scenario() -> list[tuple[Entry, Turn]]:
        leader = asyncio.ensure_future(a.ask("k", upstream))
        await asyncio.sleep(0.05)
        follower = asyncio.ensure_future(b.ask("k", upstream, wait=10))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(redis_server.stop)
        return [await leader, await follower]

    started = time.monotonic()
    results = run(scenario())
    assert [turn for _, turn in results] == [Turn.LEADER, Turn.ALONE]
    assert time.monotonic() - started < 3.0


def test_lease_must_be_positive(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="more than 0"):
        FleetFlight(RedisConnection(parse_redis_url(redis_server.url)), lease=0)
