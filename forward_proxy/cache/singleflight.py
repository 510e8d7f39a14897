"""One computation per key in flight: identical requests that arrive meanwhile wait for its result.

The first caller of a key leads: its computation runs as a task of its own (so a leader that goes away
does not cancel it). Callers that arrive while it runs wait for the same outcome: its value, or its
exception for everyone. Callers beyond `max_waiters` compute on their own rather than pile up, and a
waiter gives up after `timeout` seconds. An optional `after(value)` step (storing the result) runs once
the value is published; the key stays in flight until it ends, so late arrivals get the published value
at once instead of computing again.

>>> import asyncio
>>> async def demo():
...     flights = SingleFlight[str](max_waiters=10)
...     calls = []
...     async def compute():
...         calls.append(1)
...         await asyncio.sleep(0.01)
...         return "answer"
...     results = await asyncio.gather(*(flights.run("k", compute, timeout=1) for _ in range(5)))
...     return [role.value for _, role in results], len(calls)
>>> asyncio.run(demo())
(['leader', 'waiter', 'waiter', 'waiter', 'waiter'], 1)
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Role(enum.Enum):
    LEADER = "leader"  # started the computation
    WAITER = "waiter"  # shared the outcome of a computation already in flight
    ALONE = "alone"  # computed on its own: the waiter limit was reached


class _Flight(Generic[T]):
    __slots__ = ("outcome", "task", "waiters")

    def __init__(self, outcome: asyncio.Future[T]) -> None:
        self.outcome = outcome
        self.waiters = 0
        self.task: asyncio.Task[None] | None = None


class SingleFlight(Generic[T]):
    def __init__(self, max_waiters: int) -> None:
        self.max_waiters = max_waiters
        self._flights: dict[Hashable, _Flight[T]] = {}

    def in_flight(self, key: Hashable) -> bool:
        return key in self._flights

    async def drain(self) -> None:
        """Wait until every computation in flight, after-steps included, has ended."""
        while self._flights:
            tasks = [flight.task for flight in self._flights.values() if flight.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run(
        self,
        key: Hashable,
        compute: Callable[[], Awaitable[T]],
        *,
        timeout: float,
        after: Callable[[T], Awaitable[None]] | None = None,
    ) -> tuple[T, Role]:
        """The outcome of `compute()` for `key` and this caller's role; raises what `compute` raised,
        or `TimeoutError` when a waiter waited `timeout` seconds."""
        flight = self._flights.get(key)
        if flight is not None:
            if flight.waiters < self.max_waiters:
                flight.waiters += 1
                try:
                    value = await asyncio.wait_for(asyncio.shield(flight.outcome), timeout)
                finally:
                    flight.waiters -= 1
                return value, Role.WAITER
            value = await compute()
            if after is not None:
                await after(value)
            return value, Role.ALONE

        flight = _Flight[T](asyncio.get_running_loop().create_future())
        self._flights[key] = flight
        flight.task = asyncio.ensure_future(self._lead(key, flight, compute, after))
        return await asyncio.shield(flight.outcome), Role.LEADER

    async def _lead(
        self,
        key: Hashable,
        flight: _Flight[T],
        compute: Callable[[], Awaitable[T]],
        after: Callable[[T], Awaitable[None]] | None,
    ) -> None:
        try:
            try:
                value = await compute()
            except BaseException as exc:  # every waiter gets the leader's failure, nobody hangs
                flight.outcome.set_exception(exc)
                flight.outcome.exception()  # mark retrieved: no "never retrieved" warning without waiters
                if not isinstance(exc, Exception):
                    raise
                return
            flight.outcome.set_result(value)
            if after is not None:
                try:
                    await after(value)
                except Exception:
                    logger.exception("after-step of a single-flight computation failed")
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
