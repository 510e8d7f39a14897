"""Requests in flight: identical rows asked at once go upstream once.

A request whose rows are missing from the store `lead`s a flight for them: mitmproxy forwards it, and
its `response` (or `error`) hook `publish`es what came back. A request whose missing rows are in
flight already `join`s those flights and waits (`Flight.outcome`) instead of asking them again (it
asks the rest itself once they answered); at most
`max_waiters` wait on one flight, more lead their own. The published `Outcome` holds each row answer the
leader's answer allows to share (the same rule that decides storing); a waiter that finds a row it needs
left out, or a failure, or no outcome within its wait, goes upstream itself. So a wait never outlasts
the leader's own exchange or the caller's timeout, and a row is never lost, only computed twice.

A flight stays joinable after it published, until `finish` (when its rows are stored), so a request that
arrives between the answer and the store write gets the published rows at once instead of asking again.

Everything runs on one event loop; no method awaits, so each is atomic with respect to the others.

>>> import asyncio
>>> async def demo():
...     flights = InFlight(max_waiters=10)
...     leader = flights.lead(["a", "b"])
...     joined = flights.join(["b"])
...     flights.publish(leader, Outcome(rows={"a": 1, "b": 2}))
...     outcome = await joined[0].outcome(timeout=1)
...     return outcome.rows["b"], flights.join(["c"])
>>> asyncio.run(demo())
(2, [])
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """What a leader's exchange gave its waiters."""

    rows: dict[str, Any] = field(default_factory=dict)  # shareable row answers by row key
    context: Any = None  # what waiters need besides the rows (status, headers, version)
    failure: Any = None  # the upstream could not be reached: waiters answer with this
    live: Any = None  # a stream still arriving, for waiters to follow as it grows (`live.LiveStream`)


@dataclass(eq=False)
class Flight:
    keys: tuple[str, ...]
    _outcome: asyncio.Future[Outcome]
    waiters: int = 0

    async def outcome(self, timeout: float) -> Outcome | None:
        """The leader's outcome, or None when it gave none within `timeout` seconds."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
        except TimeoutError:
            return None

    @property
    def published(self) -> bool:
        return self._outcome.done()


class InFlight:
    def __init__(self, max_waiters: int) -> None:
        self.max_waiters = max_waiters
        self._by_key: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def join(self, keys: Sequence[str]) -> list[Flight]:
        """The flights computing any of `keys`, now waited on (a flight with `max_waiters` waiting
        already is left out); the keys no flight covers are the caller's to ask."""
        flights: dict[int, Flight] = {}
        for key in keys:
            flight = self._by_key.get(key)
            if flight is not None and flight.waiters < self.max_waiters:
                flights[id(flight)] = flight
        for flight in flights.values():
            flight.waiters += 1
        return list(flights.values())

    def answered(self, keys: Sequence[str]) -> list[str]:
        """Of `keys`, those a flight has published an answer for that is not stored yet: newer than
        whatever the store holds for them (a `no-cache` refresh being written, say)."""
        return [key for key in keys if self.answer(key) is not None]

    def answer(self, key: str) -> Outcome | None:
        """The published outcome that holds an answer for `key` not stored yet, if any."""
        flight = self._by_key.get(key)
        if flight is None or not flight.published:
            return None
        outcome = flight._outcome.result()
        return outcome if key in outcome.rows else None

    def lead(self, keys: Sequence[str]) -> Flight:
        """A new flight for `keys`; keys already in flight stay with their leader."""
        flight = Flight(tuple(dict.fromkeys(keys)), asyncio.get_running_loop().create_future())
        for key in flight.keys:
            self._by_key.setdefault(key, flight)
        return flight

    def alias(self, flight: Flight, keys: Sequence[str]) -> None:
        """`flight` computes `keys` too (the same rows under the keys of the version that answered)."""
        flight.keys = tuple(dict.fromkeys((*flight.keys, *keys)))
        for key in keys:
            self._by_key.setdefault(key, flight)

    def publish(self, flight: Flight, outcome: Outcome, *, replace: bool = False) -> None:
        """Give `flight`'s waiters `outcome`. A flight publishes once, except that with `replace` a
        later outcome supersedes an earlier one for those who join from now on (a stream shared live,
        then its whole answer)."""
        if not flight._outcome.done():
            flight._outcome.set_result(outcome)
        elif replace:
            flight._outcome = asyncio.get_running_loop().create_future()
            flight._outcome.set_result(outcome)

    def finish(self, flight: Flight) -> None:
        """The flight's rows are stored (or will never be): no longer joinable. Waiters still waiting get
        an empty outcome, and go upstream themselves."""
        self.publish(flight, Outcome())
        for key in flight.keys:
            if self._by_key.get(key) is flight:
                del self._by_key[key]
