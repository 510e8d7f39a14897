"""How many client connections the proxy holds open at once (`max_client_connections`).

A connection beyond the limit is closed as soon as it is accepted, before a byte of it is read, so that a
flood of connections, or slow clients that never finish a request (slowloris), cannot take the memory
and file descriptors the proxy needs for the clients it serves. The clients already connected are served
as before; a refused client may retry once others have closed.

Refusals are counted (`ConnectionLimit.refused`) and logged: the first at once, then at most one line a
minute with the count since, so a flood cannot flood the log too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mitmproxy import connection, ctx, exceptions

from forward_proxy.policy.egress import log_fields

log = logging.getLogger(__name__)

DEFAULT_MAX_CLIENT_CONNECTIONS = 1000
REFUSAL_LOG_SECONDS = 60.0
REASON = "max_client_connections reached"


class ConnectionLimit:
    """Closes client connections beyond `max_client_connections` at connect time."""

    def __init__(self) -> None:
        self.limit = DEFAULT_MAX_CLIENT_CONNECTIONS
        self.open: set[str] = set()  # ids of the client connections admitted and not yet closed
        self.refused = 0  # connections refused since the start
        self._unlogged = 0  # refusals since the last log line
        self._logged_at = float("-inf")

    def load(self, loader: Any) -> None:
        loader.add_option(
            "max_client_connections",
            int,
            DEFAULT_MAX_CLIENT_CONNECTIONS,
            """
            Most client connections open at once; a connection beyond it is closed as soon as it is
            accepted (and counted and logged), while the clients already connected are served on. Keep
            it under the process's file descriptor limit (ulimit -n): a client connection may hold a
            server connection too. 0 turns the limit off.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "max_client_connections" in updated:
            limit = ctx.options.max_client_connections
            if limit < 0:
                raise exceptions.OptionsError(
                    f"max_client_connections: {limit} is negative; give the most connections to hold "
                    "open at once, or 0 for no limit."
                )
            self.limit = limit

    def client_connected(self, client: connection.Client) -> None:
        if client.error:
            return  # already refused (allow_clients)
        if self.limit and len(self.open) >= self.limit:
            client.error = f"refused: {REASON}"
            self._refused(client)
            return
        self.open.add(client.id)

    def client_disconnected(self, client: connection.Client) -> None:
        self.open.discard(client.id)

    def _refused(self, client: connection.Client) -> None:
        self.refused += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < REFUSAL_LOG_SECONDS:
            return
        fields = {
            "rule": "max_client_connections",
            "reason": REASON,
            "limit": self.limit,
            "refused": self._unlogged,
            "refused_total": self.refused,
        }
        log.warning(
            "client refused " + log_fields(fields) + " (logged at most once a minute)",
            extra={"client": client.peername},
        )
        self._logged_at = now
        self._unlogged = 0
