"""The two places where the proxy reaches into mitmproxy beyond its addon API. This module owns them,
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
"""

from __future__ import annotations

import contextvars
import logging

from mitmproxy import ctx, http
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
