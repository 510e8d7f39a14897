"""The access log: one JSON line per request, with the cache's decision and never the client's address.

Option `access_log`: a file path (appended to), `-` for stderr, or empty (the default) for no log.
Option `access_log_query` (off by default): keep query strings in `path`. Off, a path keeps only a `?` where
its query was, as Squid's `strip_query_terms` does: keys and signatures sent in URLs never reach the disk.

    {"time": "2026-05-09T07:36:11.123Z", "pseudonym": "c-3f9a1b2c", "method": "POST",
     "origin": "http://127.0.0.1:8000", "path": "/v1/embeddings", "status": 200, "cache": "HIT",
     "key": "9f86d081884c7d65", "route": "POST /v1/embeddings", "model": "all-MiniLM-L6-v2",
     "upstream_seconds": null, "saved_seconds": 0.183, "total_seconds": 0.004, "bytes": 6203,
     "rows": {"rows": 4, "from_cache": 4, "upstream": 0}}

Load this addon after the cache and privacy addons: it reads what they put in `flow.metadata`
(`fp.cache`, `fp.key_id`, `fp.route`, `fp.model`, `fp.origin`, `fp.upstream_seconds`, `fp.rows`,
`fp.pseudonym`)
and tells an answer the proxy made itself (a hit, a refusal) from one the upstream sent by whether a
response exists once every addon's `request` hook has run.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, TextIO

from mitmproxy import ctx, exceptions, http

from forward_proxy.cache.record import RECORD, CacheRecord

log = logging.getLogger(__name__)

# Decisions answered from the store: `fp.upstream_seconds` is then the time the answer saved.


class AccessLog:
    def __init__(self) -> None:
        self._stream: TextIO | None = None
        self._owns_stream = False
        self._keep_query = False
        self._lock = threading.Lock()
        self._answered_by_proxy: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._logged: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    def load(self, loader: Any) -> None:
        loader.add_option(
            "access_log",
            str,
            "",
            """
            Write one JSON line per request (time, client pseudonym, method, origin, path, status,
            cache decision, key id, upstream and total seconds) to this file, or to stderr with "-".
            Empty turns the log off. The client's address is never written.
            """,
        )

        loader.add_option(
            "access_log_query",
            bool,
            False,
            """
            Keep query strings in the access log's paths. Off (the default), "/v1/x?key=..." is written
            "/v1/x?": keys and signatures that clients put in URLs never reach the log.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "access_log_query" in updated:
            self._keep_query = ctx.options.access_log_query
        if "access_log" not in updated:
            return
        self._close()
        target = ctx.options.access_log
        if not target:
            return
        if target == "-":
            self._stream = sys.stderr
            return
        try:
            self._stream = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in done()
        except OSError as exc:
            raise exceptions.OptionsError(
                f"access_log: cannot open {target!r} for appending ({exc.strerror}). "
                'Give a writable file path, "-" for stderr, or "" to turn the access log off.'
            ) from exc
        self._owns_stream = True

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            self._answered_by_proxy.add(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def done(self) -> None:
        self._close()

    def _write(self, flow: http.HTTPFlow) -> None:
        if self._stream is None or flow in self._logged:
            return  # off, or an error after the response was logged (a client gone mid-answer)
        self._logged.add(flow)
        line = json.dumps(
            access_record(
                flow, answered_by_proxy=flow in self._answered_by_proxy, keep_query=self._keep_query
            ),
            separators=(", ", ": "),
        )
        with self._lock:
            try:
                self._stream.write(line + "\n")
            except (OSError, ValueError) as exc:  # a full disk must never break the proxy
                log.warning("access_log: could not write a line (%s)", exc)

    def _close(self) -> None:
        if self._stream is not None and self._owns_stream:
            self._stream.close()
        self._stream, self._owns_stream = None, False


def access_record(
    flow: http.HTTPFlow, *, answered_by_proxy: bool, now: float | None = None, keep_query: bool = False
) -> dict[str, Any]:
    """The access log line of a finished (or failed) flow, as a JSON-ready dict; `keep_query` False
    writes the path without its query (a `?` where it was)."""
    meta: Mapping[str, Any] = flow.metadata
    request, response = flow.request, flow.response
    cache: CacheRecord | None = meta.get(RECORD)
    decision = cache.decision.value if cache is not None and cache.decision is not None else None
    finished = time.time() if now is None else now
    record: dict[str, Any] = {
        "time": _iso_time(request.timestamp_start),
        "pseudonym": meta.get("fp.pseudonym"),
        "method": request.method,
        "origin": cache.origin if cache is not None else f"{request.scheme}://{request.host}:{request.port}",
        "path": request.path if keep_query else strip_query(request.path),
        "status": response.status_code if response is not None else None,
        "cache": decision,
        "key": cache.key_id or None if cache is not None else None,
        "route": cache.route if cache is not None else None,
        "model": cache.model if cache is not None else None,
        "upstream_seconds": _upstream_seconds(flow, cache, answered_by_proxy),
        "saved_seconds": _seconds(cache.upstream_seconds)
        if cache is not None and cache.decision is not None and cache.decision.from_store
        else None,
        "total_seconds": _seconds(finished - request.timestamp_start),
        "bytes": len(response.raw_content or b"") if response is not None else None,
        "rows": cache.rows.as_dict() if cache is not None and cache.rows is not None else None,
    }
    if flow.error is not None:
        record["error"] = flow.error.msg
    return record


def strip_query(path: str) -> str:
    """`path` without its query string, a `?` left where it was.

    >>> strip_query("/v1/embeddings?key=secret"), strip_query("/v1/embeddings")
    ('/v1/embeddings?', '/v1/embeddings')
    """
    before, mark, _ = path.partition("?")
    return before + mark


def _upstream_seconds(
    flow: http.HTTPFlow, cache: CacheRecord | None, answered_by_proxy: bool
) -> float | None:
    """Seconds this request waited on the upstream; null when no upstream answer was used."""
    decision = cache.decision if cache is not None else None
    if (decision is not None and decision.from_store) or (answered_by_proxy and decision is None):
        return None
    if cache is not None and cache.upstream_seconds is not None:
        return _seconds(cache.upstream_seconds)
    response = flow.response
    if response is None or response.timestamp_start is None or flow.request.timestamp_end is None:
        return None
    return _seconds(response.timestamp_start - flow.request.timestamp_end)


def _seconds(value: Any) -> float | None:
    return None if value is None else round(max(0.0, float(value)), 6)


def _iso_time(epoch: float) -> str:
    whole = int(epoch)
    millis = int((epoch - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"
