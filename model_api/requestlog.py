"""One structured line per request: what was asked, of which model, how it ended, for which client.

The client is named only by the pseudonym the caller sends in a header (`X-Client-Pseudonym` unless
configured otherwise), never by its address. Handlers add what they know with `annotate`.

>>> line = format_line({"method": "GET", "path": "/v2", "status": 200, "duration_ms": 1.5})
>>> json.loads(line)["path"]
'/v2'
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

logger = logging.getLogger("model_api.requests")

SCOPE_KEY = "model_api.request_log"
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+/=-]")
PSEUDONYM_LENGTH = 64


def fields_of(scope: MutableMapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = scope.setdefault(SCOPE_KEY, {})
    return fields


def annotate(request: Request, **fields: Any) -> None:
    """Add fields (model, rows, error, ...) to the request's log line."""
    fields_of(request.scope).update(fields)


def pseudonym(value: str | None) -> str | None:
    """The header's value made safe for a log line: no spaces or control characters, bounded length."""
    if not value:
        return None
    return _UNSAFE.sub("_", value.strip())[:PSEUDONYM_LENGTH] or None


def format_line(fields: dict[str, Any]) -> str:
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"time": stamp, "event": "request", **fields}, separators=(",", ":"), default=str)


def write(fields: dict[str, Any]) -> None:
    logger.info(format_line(fields))
