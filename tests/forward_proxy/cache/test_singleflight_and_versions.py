"""Single flight (one upstream call per key, bounded waiters, shared failures) and version knowledge."""

from __future__ import annotations

import asyncio

import pytest

from forward_proxy.cache.singleflight import Role, SingleFlight
from forward_proxy.cache.versions import Knowledge, VersionBook


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_identical_calls_share_one_computation() -> None:
    async def scenario() -> tuple[list[object], int]:
        flights = SingleFlight[int](max_waiters=100)
        calls = 0
        release = asyncio.Event()

        async def compute() -> int:
            nonlocal calls
            calls += 1
            await release.wait()
            return 42

        tasks = [asyncio.ensure_future(flights.run("k", compute, timeout=5)) for _ in range(32)]
        await asyncio.sleep(0)
        release.set()
        return list(await asyncio.gather(*tasks)), calls

    results, calls = run(scenario())  # type: ignore[misc]
    assert calls == 1
    assert results[0] == (42, Role.LEADER)
    assert results[1:] == [(42, Role.WAITER)] * 31


def test_a_failing_leader_fails_every_waiter_and_the_next_call_retries() -> None:
    async def scenario() -> None:
        flights = SingleFlight[int](max_waiters=100)
        release = asyncio.Event()
        attempts = 0

        async def failing() -> int:
            nonlocal attempts
            attempts += 1
            await release.wait()
            raise ConnectionError("upstream down")

        tasks = [asyncio.ensure_future(flights.run("k", failing, timeout=5)) for _ in range(5)]
        await asyncio.sleep(0)
        release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
        assert not flights.in_flight("k")

        async def working() -> int:
            return 7

        assert await flights.run("k", working, timeout=5) == (7, Role.LEADER)
        assert attempts == 1

    run(scenario())


def test_waiters_beyond_the_limit_compute_on_their_own() -> None:
    async def scenario() -> list[Role]:
        flights = SingleFlight[int](max_waiters=2)
        release = asyncio.Event()

        async def compute() -> int:
            await release.wait()
            return 1

        tasks = [asyncio.ensure_future(flights.run("k", compute, timeout=5)) for _ in range(5)]
        for _ in range(3):
            await asyncio.sleep(0)
        release.set()
        return [role for _, role in await asyncio.gather(*tasks)]

    roles = run(scenario())
    assert roles == [Role.LEADER, Role.WAITER, Role.WAITER, Role.ALONE, Role.ALONE]


def test_a_waiter_gives_up_after_its_timeout_and_nobody_hangs() -> None:
    async def scenario() -> None:
        flights = SingleFlight[int](max_waiters=10)

        async def slow() -> int:
            await asyncio.sleep(0.3)
            return 1

        leader = asyncio.ensure_future(flights.run("k", slow, timeout=5))
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await flights.run("k", slow, timeout=0.05)
        assert await leader == (1, Role.LEADER)

    run(scenario())


def test_late_arrivals_get_the_published_value_while_after_runs() -> None:
    async def scenario() -> None:
        flights = SingleFlight[int](max_waiters=10)
        stored = asyncio.Event()
        calls = 0

        async def compute() -> int:
            nonlocal calls
            calls += 1
            return 5

        async def after(value: int) -> None:
            await stored.wait()

        assert await flights.run("k", compute, timeout=5, after=after) == (5, Role.LEADER)
        assert flights.in_flight("k")
        assert await flights.run("k", compute, timeout=5) == (5, Role.WAITER)
        stored.set()
        await asyncio.sleep(0.01)
        assert not flights.in_flight("k")
        assert calls == 1

    run(scenario())


def test_a_cancelled_leader_does_not_cancel_the_computation() -> None:
    async def scenario() -> None:
        flights = SingleFlight[int](max_waiters=10)

        async def compute() -> int:
            await asyncio.sleep(0.05)
            return 3

        leader = asyncio.ensure_future(flights.run("k", compute, timeout=5))
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(flights.run("k", compute, timeout=5))
        await asyncio.sleep(0)
        leader.cancel()
        assert await waiter == (3, Role.WAITER)

    run(scenario())


def test_version_knowledge_ages_from_fresh_to_due_to_expired() -> None:
    book = VersionBook(interval=10)
    origin = "http://127.0.0.1:8000"
    assert not book.known(origin) and book.state(origin, 0) is Knowledge.EXPIRED
    assert book.learn(origin, "v1", now=100) is True
    assert book.current(origin) == "v1"
    assert [book.state(origin, now).value for now in (100, 104.9, 105, 109.9, 110)] == [
        "fresh",
        "fresh",
        "due",
        "due",
        "expired",
    ]
    assert book.learn(origin, "v1", now=110) is False
    assert book.state(origin, 111) is Knowledge.FRESH
    assert book.learn(origin, "v2", now=112) is True and book.current(origin) == "v2"
    assert book.learn(origin, None, now=113) is True and book.current(origin) is None


def test_an_interval_of_zero_turns_re_checks_off() -> None:
    book = VersionBook(interval=0)
    assert book.state("http://m:1", 0) is Knowledge.FRESH
