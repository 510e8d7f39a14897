"""The admin listener's HTTP server: `/stats`, `/stats/history`, `/metrics` and the dashboard.

A stdlib `ThreadingHTTPServer` in daemon threads, so a slow scrape or a slow disk never blocks the proxy's
event loop; it answers directly (no proxy setting needed). A sampler thread records a compact summary of
the report every `interval` seconds in a bounded `History`, which the dashboard draws over time.

    GET /                 the dashboard (dashboard/index.html, .css, .js: self-contained, no external URL)
    GET /stats            the report of `report.py`, as JSON
    GET /stats/history    {"interval_seconds": 2.0, "samples": [{"time": ..., "requests": ..., ...}]}
    GET /metrics          Prometheus text format (see `metrics.py`)

`admin.py` is the mitmproxy addon that starts and stops this server with the proxy.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from forward_proxy.errors import error_body
from forward_proxy.stats.metrics import CONTENT_TYPE_LATEST, render_metrics

log = logging.getLogger(__name__)

ReportReader = Callable[[], Mapping[str, Any]]

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
_STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
}

# The report fields a history sample keeps: enough for the charts, small enough to keep many.
SAMPLE_FIELDS = (
    "requests",
    "hits",
    "misses",
    "bypasses",
    "refreshes",
    "coalesced",
    "stale",
    "partials",
    "rows",
    "rows_from_cache",
    "upstream_seconds_saved",
    "bytes_served_from_cache",
    "entries",
    "size_bytes",
)


class History:
    """The last `capacity` samples of the report, oldest first; safe to use from several threads."""

    def __init__(self, interval: float, capacity: int) -> None:
        self.interval = interval
        self._samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, report: Mapping[str, Any]) -> None:
        sample = {"time": report["generated_at"], **{name: report[name] for name in SAMPLE_FIELDS}}
        with self._lock:
            self._samples.append(sample)

    def as_json(self) -> dict[str, Any]:
        with self._lock:
            return {"interval_seconds": self.interval, "samples": list(self._samples)}


class AdminServer:
    """Serves one report reader on `host:port` until `stop()`; `port` 0 picks a free one."""

    def __init__(
        self,
        read_report: ReportReader,
        host: str = "127.0.0.1",
        port: int = 0,
        history_interval: float = 2.0,
        history_capacity: int = 900,  # 30 minutes at 2 s
    ) -> None:
        self.read_report = read_report
        self.history = History(history_interval, history_capacity)
        self._http = ThreadingHTTPServer((host, port), _Handler)
        self._http.daemon_threads = True
        self._http.admin = self  # type: ignore[attr-defined]  # how the handler finds us
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/"

    def start(self) -> AdminServer:
        self._threads = [
            threading.Thread(
                target=self._http.serve_forever, kwargs={"poll_interval": 0.1}, name="admin-http", daemon=True
            ),
            threading.Thread(target=self._sample_forever, name="admin-history", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._http.shutdown()
        self._http.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def sample(self) -> None:
        """Add one sample of the current report to the history (the sampler thread does this)."""
        try:
            self.history.add(self.read_report())
        except Exception as exc:  # the store may be briefly unavailable; the next tick tries again
            log.warning("admin listener: could not sample the statistics (%s)", exc)

    def _sample_forever(self) -> None:
        self.sample()
        while not self._stopping.wait(self.history.interval):
            self.sample()


class _Handler(BaseHTTPRequestHandler):
    server_version = "forward-proxy-admin"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        admin: AdminServer = self.server.admin  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        try:
            if path in _STATIC_FILES:
                name, content_type = _STATIC_FILES[path]
                body = (DASHBOARD_DIR / name).read_bytes()
                self._send(HTTPStatus.OK, content_type, body, send_body)
            elif path == "/stats":
                self._send_json(HTTPStatus.OK, admin.read_report(), send_body)
            elif path == "/stats/history":
                self._send_json(HTTPStatus.OK, admin.history.as_json(), send_body)
            elif path == "/metrics":
                self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, render_metrics(admin.read_report), send_body)
            else:
                message = (
                    f"{path} is not an admin page; try / (the dashboard), /stats, /stats/history or /metrics."
                )
                self._send(
                    HTTPStatus.NOT_FOUND, "application/json", error_body("not_found", message), send_body
                )
        except Exception as exc:  # a broken store must not kill the listener: say what failed
            log.warning("admin listener: %s failed (%s)", path, exc)
            message = f"the statistics could not be read ({exc}); check the cache directory or store."
            body = error_body("stats_unavailable", message)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "application/json", body, send_body)

    def _send_json(self, status: HTTPStatus, payload: Mapping[str, Any], send_body: bool) -> None:
        self._send(status, "application/json", json.dumps(payload).encode(), send_body)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin listener: " + format, *args)
