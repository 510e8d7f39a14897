"""The three places where the proxy reaches into mitmproxy beyond its addon API. This module owns them,
and `tests/forward_proxy/test_mitmseams.py` fails loudly when a mitmproxy upgrade moves them.

1. **The answer to a failed exchange.** When mitmproxy cannot get an answer from the upstream (connection
   refused, reset, timed out) it calls the `error` hook, then writes an error page itself
   (`_http1.make_error_response`, which `ProtocolErrors` replaces with the JSON error shape). An addon
   cannot set `flow.response` there. `answer_instead(response)`, called from an `error` hook, makes that
   page the given response instead (the cache's stale entry, or its error with `X-Cache`). It works
   because mitmproxy writes the page in the same asyncio task that ran the `error` hook, right after it:
   the response travels in a context variable of that task, so no other connection can pick it up.
2. **Giving up on a hung upstream.** mitmproxy waits for an answer as long as the connection lives.
   `abort_upstream(flow)` closes the flow's server connection, so mitmproxy ends the exchange with an
   error (and the `error` hook) at the moment the cache's `upstream_timeout` runs out.
3. **Event dispatch** (`HookTable`): mitmproxy looks every addon's hook up on every event; the table
   looks them up once per set of addons.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from typing import Any

from mitmproxy import ctx, exceptions, hooks, http
from mitmproxy.addonmanager import AddonManager, safecall
from mitmproxy.net.http import http1

logger = logging.getLogger(__name__)

_ANSWER: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "forward_proxy_error_answer", default=None
)


def answer_instead(response: http.Response) -> None:
    """From an `error` hook: the client gets `response` (sent with `Connection: close`) instead of
    mitmproxy's error page."""
    response.headers["connection"] = "close"
    _ANSWER.set(http1.assemble_response(response))


def take_answer() -> bytes | None:
    """The response an `error` hook of this task asked for, once (`ProtocolErrors` calls this)."""
    answer = _ANSWER.get()
    if answer is not None:
        _ANSWER.set(None)
    return answer


def abort_upstream(flow: http.HTTPFlow) -> bool:
    """Close the server connection of `flow` (a live exchange waiting for its answer); whether it could."""
    try:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(flow.client_conn.id)
        io = handler.transports.get(flow.server_conn) if handler is not None else None
        writer = io.writer if io is not None else None
    except AttributeError as exc:  # mitmproxy changed its insides: the exchange waits on
        logger.warning(f"cannot close a hung upstream connection with this mitmproxy: {exc}")
        return False
    if writer is None:
        return False
    writer.close()
    return True


class HookTable(AddonManager):
    """mitmproxy's addon manager, with each event's handlers looked up once per set of addons.

    mitmproxy hands every event to every addon in the chain, looking each one's hook up by name on every
    call; with the thirty-odd addons of a forward proxy and eight events a request, that lookup is most
    of a cache hit's CPU. This table keeps, per event name, the handlers that exist, in chain order, and
    rebuilds them whenever an addon is registered or removed (scripts included). The calls, their order,
    their arguments and the error handling (`safecall`, `AddonHalt`) are mitmproxy's own.
    """

    _generation = 0
    _tables: dict[str, tuple[int, list[list[Any]]]]

    def register(self, addon: Any) -> Any:
        self._generation += 1
        return super().register(addon)

    def remove(self, addon: Any) -> None:
        self._generation += 1
        super().remove(addon)

    def clear(self) -> None:
        self._generation += 1
        super().clear()

    def _handlers(self, event: hooks.Hook) -> list[list[Any]]:
        tables = self.__dict__.setdefault("_tables", {})
        cached = tables.get(event.name)
        if cached is not None and cached[0] == self._generation:
            return cached[1]
        table = [[func for _, func in self._iter_hooks(addon, event)] for addon in self.chain]
        table = [handlers for handlers in table if handlers]
        tables[event.name] = (self._generation, table)
        return table

    async def trigger_event(self, event: hooks.Hook) -> None:
        arguments = event.args()
        for handlers in self._handlers(event):
            try:
                with safecall():
                    for func in handlers:
                        result = func(*arguments)
                        if result is not None and inspect.isawaitable(result):
                            await result
            except exceptions.AddonHalt:
                return


def use_hook_table(master: Any) -> None:
    """Make `master` dispatch events through a `HookTable` (before its addons are added)."""
    master.addons.__class__ = HookTable
