"""The errors mitmproxy itself answers, in the project's one JSON error shape.

Before any addon sees a request, mitmproxy's HTTP/1 layer refuses what it cannot read (a malformed request
line or header, a body over `body_size_limit`) and answers when it cannot reach the upstream of a route
the cache does not handle. It writes those answers with `make_error_response`, an HTML page. This addon
replaces that function, for as long as it is loaded, with one that writes the same status with
`Content-Type: application/json` and `{"error": {"code", "message", "status"}}`, so a client gets one error
shape whoever answered. A failed `CONNECT` (an unreachable target, or the proxy's own port) does have a
hook, `http_connect_error`: there the plain-text answer becomes `upstream_unreachable` or `proxy_loop`.

mitmproxy offers no hook for this (its error pages are built inside the protocol layer), so the addon
swaps the module attribute the layer calls. Where a mitmproxy version lacks it, the addon logs that once
and mitmproxy's HTML pages stay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import http, version
from mitmproxy.net.http import http1

from forward_proxy.errors import error_body, error_response
from forward_proxy.mitmseams import take_answer

logger = logging.getLogger(__name__)

# status -> (code, what the client can do about it)
_ADVICE: dict[int, tuple[str, str]] = {
    400: ("bad_request", "Send a well-formed HTTP/1.1 request."),
    408: ("request_timeout", "Send the whole request without pausing."),
    413: ("request_too_large", "Send a smaller body, or ask for a larger body_size_limit on the proxy."),
    414: ("request_too_large", "Send a shorter request target."),
    431: ("request_too_large", "Send fewer or smaller headers."),
    501: ("not_implemented", "Use a method and protocol the proxy supports."),
    502: ("upstream_failed", "Check that the upstream is running and reachable."),
    503: ("proxy_unavailable", "Try again shortly."),
    504: ("upstream_timeout", "The upstream did not answer in time; try again or check the upstream."),
}


def json_error_response(status_code: int, message: str = "") -> bytes:
    """The bytes of a `Connection: close` error answer in the project's JSON shape, or the answer an
    `error` hook chose instead (`forward_proxy.mitmseams.answer_instead`: the cache's stale entry)."""
    chosen = take_answer()
    if chosen is not None:
        return chosen
    code, advice = _ADVICE.get(status_code, ("proxy_error" if status_code >= 500 else "bad_request", ""))
    text = message.strip() or http.status_codes.RESPONSES.get(status_code, "error")
    if status_code in (502, 504):
        text = f"The proxy got no answer from the upstream: {text}"
    if not text.endswith((".", "!", "?")):
        text += "."
    body = error_body(code, f"{text} {advice}".strip(), status=status_code)
    response = http.Response.make(
        status_code,
        body,
        http.Headers(
            Server=version.MITMPROXY,
            Connection="close",
            Content_Type="application/json",
            Cache_Control="no-store",
        ),
    )
    return http1.assemble_response(response)


def _connect_failure(text: str) -> str:
    """The cause in mitmproxy's "Cannot connect to HOST: CAUSE If you plan to ..." text.

    >>> _connect_failure("Cannot connect to 127.0.0.1:1: [Errno 111] Connect call failed "
    ...                  "('127.0.0.1', 1) If you plan to redirect requests away ...")
    "[Errno 111] Connect call failed ('127.0.0.1', 1)"
    """
    cause = text.split(" If you plan to", 1)[0].strip()
    if cause.startswith("Cannot connect to "):
        cause = cause.removeprefix("Cannot connect to ").split(": ", 1)[-1]
    return cause.strip() or "no answer"


class ProtocolErrors:
    """Answers mitmproxy's own HTTP/1 refusals in the JSON error shape instead of HTML."""

    def __init__(self) -> None:
        self._original: Callable[..., bytes] | None = None

    def load(self, loader: Any) -> None:
        from mitmproxy.proxy.layers.http import _http1

        current = getattr(_http1, "make_error_response", None)
        if current is None:
            logger.warning("protocol errors: this mitmproxy has no make_error_response; its errors stay HTML")
            return
        if current is not json_error_response:
            self._original = current
            _http1.make_error_response = json_error_response  # type: ignore[attr-defined]

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        """A CONNECT that failed (unreachable target, the proxy's own port) in the JSON shape; mitmproxy
        writes those as plain text. Answers an addon already wrote in JSON (egress, auth) stay."""
        response = flow.response
        if response is None or response.headers.get("content-type", "").startswith("application/json"):
            return
        target = f"{flow.request.host}:{flow.request.port}"
        cause = _connect_failure(response.get_text(strict=False) or "")
        if "destination unknown" in cause:  # mitmproxy was asked to connect to itself
            code = "proxy_loop"
            message = (
                f"{target} is this proxy itself; a CONNECT through the proxy to its own port would loop. "
                "Ask for the upstream's address instead."
            )
        else:
            code = "upstream_unreachable"
            message = (
                f"The proxy could not connect to {target} ({cause}). Check that the upstream is running "
                "and reachable from the proxy."
            )
        flow.response = error_response(response.status_code, code, message, upstream=target)

    def done(self) -> None:
        if self._original is None:
            return
        from mitmproxy.proxy.layers.http import _http1

        if getattr(_http1, "make_error_response", None) is json_error_response:
            _http1.make_error_response = self._original  # type: ignore[attr-defined]
        self._original = None
