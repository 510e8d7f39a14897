"""Row flights: a row shared by concurrent batches is computed by one of them, and no wait is unbounded."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from forward_proxy.cache.rowflight import RowFlight


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(asyncio.wait_for(test(), timeout=20))

    return run


@in_loop
async def test_the_first_claim_leads_and_later_claims_follow() -> None:
    flight: RowFlight[str, bytes] = RowFlight()
    first = flight.claim(["a", "b", "a"])
    second = flight.claim(["b", "c"])
    assert first.led == ("a", "b") and not first.followed
    assert second.led == ("c",) and list(second.followed) == ["b"]
    waiting = asyncio.create_task(flight.wait(second, timeout=5))
    await asyncio.sleep(0)
    assert not waiting.done()
    flight.publish(first, {"a": b"A", "b": b"B"})
    assert await waiting == {"b": b"B"}
    assert len(flight) == 1  # only "c" is still in flight
    flight.publish(second, {"c": b"C"})
    assert len(flight) == 0


@in_loop
async def test_rows_a_leader_could_not_answer_come_back_to_their_followers() -> None:
    flight: RowFlight[str, bytes] = RowFlight()
    leader = flight.claim(["a", "b"])
    follower = flight.claim(["a", "b"])
    flight.publish(leader, {"a": b"A"})  # "b" could not be stored
    assert await flight.wait(follower, timeout=5) == {"a": b"A"}
    again = flight.claim(["b"])
    assert again.led == ("b",)  # the follower may now lead it itself


@in_loop
async def test_abandon_releases_every_follower_at_once() -> None:
    flight: RowFlight[str, bytes] = RowFlight()
    leader = flight.claim(["a"])
    followers = [flight.claim(["a"]) for _ in range(3)]
    waits = [asyncio.create_task(flight.wait(claim, timeout=30)) for claim in followers]
    flight.abandon(leader)
    assert await asyncio.wait_for(asyncio.gather(*waits), timeout=5) == [{}, {}, {}]
    assert len(flight) == 0


@in_loop
async def test_a_wait_ends_at_its_timeout_without_disturbing_the_leader() -> None:
    flight: RowFlight[str, bytes] = RowFlight()
    leader = flight.claim(["a"])
    early = flight.claim(["a"])
    patient = flight.claim(["a"])
    patient_wait = asyncio.create_task(flight.wait(patient, timeout=30))
    assert await flight.wait(early, timeout=0.01) == {}
    flight.publish(leader, {"a": b"A"})
    assert await patient_wait == {"a": b"A"}


@in_loop
async def test_a_cancelled_follower_leaves_the_flight_alone() -> None:
    flight: RowFlight[str, bytes] = RowFlight()
    leader = flight.claim(["a"])
    cancelled = asyncio.create_task(flight.wait(flight.claim(["a"]), timeout=30))
    other = asyncio.create_task(flight.wait(flight.claim(["a"]), timeout=30))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    flight.publish(leader, {"a": b"A"})
    assert await other == {"a": b"A"}


@in_loop
async def test_too_many_followers_compute_alone() -> None:
    flight: RowFlight[str, bytes] = RowFlight(max_waiters=1)
    flight.claim(["a"])
    assert list(flight.claim(["a"]).followed) == ["a"]
    crowded = flight.claim(["a", "b"])
    assert crowded.alone == ("a",) and crowded.led == ("b",) and not crowded.followed


@in_loop
async def test_publishing_twice_or_after_abandon_changes_nothing() -> None:
    flight: RowFlight[str, bytes] = RowFlight()
    leader = flight.claim(["a"])
    follower = flight.claim(["a"])
    flight.abandon(leader)
    flight.publish(leader, {"a": b"late"})
    assert await flight.wait(follower, timeout=1) == {}
    newer = flight.claim(["a"])
    flight.publish(leader, {"a": b"stale"})  # the old leader cannot settle the newer flight
    assert len(flight) == 1 and newer.led == ("a",)


def test_claims_need_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        RowFlight[str, bytes]().claim(["a"])


@in_loop
async def test_publish_some_answers_part_of_a_claim_early() -> None:
    flight: RowFlight[str, bytes] = RowFlight()
    leader = flight.claim(["a", "b"])
    follower = flight.claim(["a", "b"])
    before = flight.publications
    flight.publish_some(leader, {"a": b"A"})
    assert flight.publications == before + 1
    assert leader.led == ("b",) and not leader.settled
    assert follower.followed["a"].result() == b"A" and not follower.followed["b"].done()
    flight.publish(leader, {"b": b"B"})
    assert await flight.wait(follower, timeout=5) == {"a": b"A", "b": b"B"}
    assert len(flight) == 0
