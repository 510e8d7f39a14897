"""The proxy's one error shape, used by every addon that answers on the upstream's behalf.

    {"error": {"code": "upstream_unreachable", "message": "what happened and what to do", ...extra}}

served with `Content-Type: application/json` and a status that fits (502 upstream failed, 504 upstream
too slow or only-if-cached miss, 403 refused by policy, 407 proxy authentication, ...).
"""

from __future__ import annotations

import json
import time
from typing import Any

from mitmproxy import http


def error_body(code: str, message: str, **extra: Any) -> bytes:
    """The JSON bytes of an error: `code` is snake_case, `message` says what happened and what to do."""
    return json.dumps({"error": {"code": code, "message": message, **extra}}).encode()


def error_response(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> http.Response:
    """A ready mitmproxy response carrying the error; `extra` fields join `code` and `message`."""
    content = error_body(code, message, **extra)
    now = time.time()
    fields = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        (b"cache-control", b"no-store"),
    ]
    fields += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    return http.Response(
        http_version=b"HTTP/1.1",
        status_code=status,
        reason=b"",
        headers=http.Headers(fields),
        content=content,
        trailers=None,
        timestamp_start=now,
        timestamp_end=now,
    )
