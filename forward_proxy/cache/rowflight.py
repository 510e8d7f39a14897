"""Rows in flight: concurrent batches that share rows have each shared row computed once.

A batch that lacks rows in the cache claims them (`RowFlight.claim`). A row nobody is computing becomes
the claim's own (`led`): its batch sends it upstream and, when the answer is in, `publish`es it. A row
that another batch's upstream call is computing right now is `followed`: the batch `wait`s for that
call instead of sending the row again. A row already followed by `max_waiters` batches is computed
`alone`, so one slow call never holds an unbounded crowd.

A leader that fails (upstream error, client gone, an answer that cannot be stored) publishes nothing
for the rows it could not answer, or calls `abandon`: their followers learn at once that the row is
unavailable and compute it themselves, as they do when `wait` runs out of time. So every wait is bounded
by the leader's own upstream call or the caller's timeout, and a row is never lost, only computed twice.

A batch looks rows up in the store before it claims them, and a leader stores its rows before it
publishes them; so a batch whose lookup overlapped a publication (`publications` changed) may lead rows
that are in the store by now. It looks those up once more and hands what it finds to its own followers
at once (`publish_some`) instead of computing them again.

Claims only follow rows claimed before them and never wait while claiming, so waits cannot form a
cycle. All methods run on one event loop; `claim`, `publish` and `abandon` never await, which makes each
of them atomic with respect to the other batches. The rows in flight are this process's own: proxies
sharing a cache directory or Redis each compute a row at most once, together at most once per process.

>>> import asyncio
>>> async def demo():
...     flight = RowFlight()
...     first, second = flight.claim(["a", "b"]), flight.claim(["b", "c"])
...     flight.publish(first, {"a": 1, "b": 2})
...     return first.led, second.led, await flight.wait(second, timeout=1)
>>> asyncio.run(demo())
(('a', 'b'), ('c',), {'b': 2})
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(eq=False)
class Claim(Generic[K, V]):
    """What one batch computes (`led`, `alone`) and what it waits for (`followed`)."""

    led: tuple[K, ...]
    followed: dict[K, asyncio.Future[V | None]]
    alone: tuple[K, ...]
    settled: bool = field(default=False)  # published or abandoned: the led rows are no longer in flight


@dataclass(eq=False)
class _Flight(Generic[K, V]):
    leader: Claim[K, V]
    answer: asyncio.Future[V | None]
    waiters: int = 0


class RowFlight(Generic[K, V]):
    """The rows being computed upstream right now, each by the one claim that leads it."""

    def __init__(self, max_waiters: int = 1000) -> None:
        self.max_waiters = max_waiters
        self._flights: dict[K, _Flight[K, V]] = {}
        self.publications = 0  # how many times answers were published: a change means rows were stored

    def __len__(self) -> int:
        return len(self._flights)

    def claim(self, keys: Iterable[K]) -> Claim[K, V]:
        """Lead the rows nobody computes, follow the others (duplicates in `keys` count once)."""
        loop = asyncio.get_running_loop()
        claim: Claim[K, V] = Claim((), {}, ())
        led: list[K] = []
        alone: list[K] = []
        for key in dict.fromkeys(keys):
            flight = self._flights.get(key)
            if flight is None:
                self._flights[key] = _Flight(claim, loop.create_future())
                led.append(key)
            elif flight.waiters < self.max_waiters:
                flight.waiters += 1
                claim.followed[key] = flight.answer
            else:
                alone.append(key)
        claim.led, claim.alone = tuple(led), tuple(alone)
        claim.settled = not led
        return claim

    async def wait(self, claim: Claim[K, V], timeout: float) -> dict[K, V]:
        """The followed rows whose leaders published them within `timeout` seconds.

        The rows missing from the result are the caller's to compute. Cancelling the caller leaves the
        leaders' calls alone.
        """
        if not claim.followed:
            return {}
        await asyncio.wait(claim.followed.values(), timeout=timeout)
        return {
            key: answer
            for key, future in claim.followed.items()
            if future.done() and (answer := future.result()) is not None
        }

    def publish(self, claim: Claim[K, V], answers: Mapping[K, V]) -> None:
        """Hand the led rows' answers to their followers; led rows missing from `answers` are unavailable."""
        if claim.settled:
            return
        claim.settled = True
        self._settle(claim, claim.led, answers)

    def publish_some(self, claim: Claim[K, V], answers: Mapping[K, V]) -> None:
        """Hand the answers of some led rows to their followers now; the claim leads the others still."""
        if claim.settled or not answers:
            return
        self._settle(claim, [key for key in claim.led if key in answers], answers)
        claim.led = tuple(key for key in claim.led if key not in answers)
        claim.settled = not claim.led

    def _settle(self, claim: Claim[K, V], keys: Iterable[K], answers: Mapping[K, V]) -> None:
        if answers:
            self.publications += 1
        for key in keys:
            flight = self._flights.get(key)
            if flight is None or flight.leader is not claim:
                continue
            del self._flights[key]
            flight.answer.set_result(answers.get(key))

    def abandon(self, claim: Claim[K, V]) -> None:
        """The leader gives up: every row it leads is unavailable to its followers now."""
        self.publish(claim, {})
