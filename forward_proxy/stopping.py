"""Stopping `forward-proxy run` without dropping the requests it is answering.

On the first SIGINT or SIGTERM the proxy stops listening at once (new connections are refused), lets the
requests already in flight be answered for up to `DRAIN_SECONDS`, then stops. A second signal stops it at
once. Kept-alive connections with no request in flight are closed at the stop.

Without this, a stop cut every request in flight: the client got no answer, although the upstream may
have computed it already.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

# Less than the `--workers` supervisor's wait for a worker (workers.STOP_SECONDS) and than the stop
# timeout of most process managers.
DRAIN_SECONDS = 10.0
SETTLE_SECONDS = 0.2  # for the last answers to be written after their `response` hook ran


class GracefulStop:
    """A mitmproxy addon that knows the requests in flight; `request_stop(master)` handles the signal."""

    def __init__(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        self.drain_seconds = drain_seconds
        self.in_flight: set[str] = set()  # flow ids: request headers read, no response or error yet
        self._stopping: asyncio.Task[None] | None = None

    def requestheaders(self, flow: Any) -> None:
        self.in_flight.add(flow.id)

    def response(self, flow: Any) -> None:
        self.in_flight.discard(flow.id)

    def error(self, flow: Any) -> None:
        self.in_flight.discard(flow.id)

    def request_stop(self, master: Any) -> None:
        if self._stopping is not None:
            logger.warning("stopping now, without waiting for the requests in flight")
            master.shutdown()
            return
        master.options.update(server=False)  # close the listeners: new connections are refused
        self._stopping = asyncio.ensure_future(self._drain_then_stop(master))

    async def _drain_then_stop(self, master: Any) -> None:
        deadline = time.monotonic() + self.drain_seconds
        if self.in_flight:
            logger.info(f"stopping: answering {len(self.in_flight)} requests in flight first")
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            logger.warning(
                f"stopping with {len(self.in_flight)} requests unanswered after {self.drain_seconds:g}s"
            )
        await asyncio.sleep(SETTLE_SECONDS)
        master.shutdown()
