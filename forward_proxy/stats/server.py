"""The admin listener's HTTP server: `/stats`, `/stats/history`, `/metrics` and the dashboard.

A tornado `HTTPServer` (tornado ships with mitmproxy) on the event loop of the thread that starts it:
inside the proxy that is mitmproxy's own loop, so the listener costs no thread per connection; a caller
without a running loop (a test, a script) gets a private loop in one daemon thread. Reading the report
(disk or Redis I/O) runs in the loop's default executor, so a slow scrape or a slow disk never blocks the
proxy. A sampler task records a compact summary of the report every `interval` seconds in a bounded
`History`, which the dashboard draws over time.

    GET /                 the dashboard (dashboard/index.html, .css, .js: self-contained, no external URL)
    GET /stats            the report of `report.py`, as JSON
    GET /stats/history    {"interval_seconds": 2.0, "samples": [{"time": ..., "requests": ..., ...}]}
    GET /metrics          Prometheus text format (see `metrics.py`)

Who may ask (`AdminAccess`): a client outside `admits` is disconnected before it sends a byte; a request
whose `Host` is not one of `hosts` (loopback names, the listener's own address, the names the operator
adds) is refused with 403, so a page that rebinds its DNS name to 127.0.0.1 cannot read the statistics; at
most `max_connections` connections are open at once (more are closed at once) and a connection idle for
`idle_timeout` seconds is closed. Nothing the listener logs names a client: tornado's own messages about
client connections (which carry the peer address) are reduced to a debug line without it.

`admin.py` is the mitmproxy addon that starts and stops this server with the proxy.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from tornado import httpserver, iostream, netutil, web

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
    "completion_tokens_saved",
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


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class AdminAccess:
    """Who may use the listener: client addresses, `Host` names, how many connections, for how long."""

    admits: Callable[[str], bool] = lambda address: True
    hosts: frozenset[str] = LOOPBACK_HOSTS
    max_connections: int = 64
    idle_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    _names: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_names", frozenset(name.lower() for name in self.hosts))

    def allows_host(self, host_header: str | None) -> bool:
        """Whether a request with this `Host` (port or no port, IPv6 in brackets) is for this listener.

        >>> AdminAccess().allows_host("127.0.0.1:8081"), AdminAccess().allows_host("[::1]:8081")
        (True, True)
        >>> AdminAccess().allows_host("attacker.example:8081"), AdminAccess().allows_host(None)
        (False, False)
        """
        if not host_header:
            return False
        host = host_header.strip().lower()
        if host.startswith("["):
            name = host[1 : host.find("]")] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return name in self._names


class AdminServer:
    """Serves one report reader on `host:port` until `stop()`; `port` 0 picks a free one.

    The port is bound by the constructor (an `OSError` there says it is taken); `start()` serves it."""

    def __init__(
        self,
        read_report: ReportReader,
        host: str = "127.0.0.1",
        port: int = 0,
        history_interval: float = 2.0,
        history_capacity: int = 900,  # 30 minutes at 2 s
        access: AdminAccess | None = None,
    ) -> None:
        self.read_report = read_report
        self.history = History(history_interval, history_capacity)
        self.access = access if access is not None else AdminAccess()
        self._sockets = netutil.bind_sockets(port, host, family=_family(host))
        self._listener: _Listener | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> AdminServer:
        """Serve on the running event loop, or on a private one in a daemon thread when none runs."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = self._loop = asyncio.new_event_loop()
            self._own_thread = threading.Thread(target=loop.run_forever, name="admin-http", daemon=True)
            self._own_thread.start()
            asyncio.run_coroutine_threadsafe(_call(self._serve), loop).result(timeout=30)
        else:
            self._serve()
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:  # never started: only the bound sockets to close
            for sock in self._sockets:
                sock.close()
            return
        if self._own_thread is not None:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            self._own_thread.join(timeout=5)
            loop.close()
            self._own_thread = None
        else:  # on the loop's own thread: stop listening now (a restart binds the port again at once)
            task = loop.create_task(self._close(self._stop_listening()))
            _background.add(task)
            task.add_done_callback(_background.discard)
        self._loop = None

    def sample(self) -> None:
        """Add one sample of the current report to the history (the sampler task does this)."""
        try:
            self.history.add(self.read_report())
        except Exception as exc:  # the store may be briefly unavailable; the next tick tries again
            log.warning("admin listener: could not sample the statistics (%s)", exc)

    def _serve(self) -> None:
        application = web.Application(
            [(r"/.*", _Page, {"admin": self})], log_function=_log_nothing, compress_response=False
        )
        listener = _Listener(
            application,
            idle_connection_timeout=self.access.idle_timeout,
            body_timeout=self.access.idle_timeout,
            max_header_size=self.access.max_header_bytes,
            max_body_size=0,
        )
        listener.access = self.access
        listener.add_sockets(self._sockets)
        self._listener = listener
        _QUIET_TORNADO.install()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    def _stop_listening(self) -> _Listener | None:
        """Close the listening sockets and stop sampling; returns the listener whose connections remain."""
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        return listener

    async def _close(self, listener: _Listener | None = None) -> None:
        listener = listener or self._stop_listening()
        if listener is not None:
            await listener.close_all_connections()
            _QUIET_TORNADO.uninstall()

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.history.interval)


async def _call(function: Callable[[], None]) -> None:
    function()


_background: set[asyncio.Task[None]] = set()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_UNSPEC


def _log_nothing(handler: web.RequestHandler) -> None:
    """tornado's access log names the client; the admin listener keeps none."""


class _Listener(httpserver.HTTPServer):
    """tornado's HTTP server with the admin's client check and connection bound."""

    access: AdminAccess
    open_connections = 0

    def handle_stream(self, stream: iostream.IOStream, address: tuple[Any, ...]) -> None:
        if self.open_connections >= self.access.max_connections or not _admits(self.access, address):
            stream.close()  # before a byte is read: a refused or surplus client costs nothing more
            return
        self.open_connections += 1
        super().handle_stream(stream, address)

    def on_close(self, server_conn: object) -> None:
        self.open_connections -= 1
        super().on_close(server_conn)


def _admits(access: AdminAccess, address: tuple[Any, ...]) -> bool:
    try:
        return bool(address) and access.admits(str(address[0]))
    except ValueError:  # not an IP address (a Unix socket): nobody to check
        return False


class _Page(web.RequestHandler):
    admin: AdminServer

    def initialize(self, admin: AdminServer) -> None:
        self.admin = admin

    def set_default_headers(self) -> None:
        self.set_header("Server", "forward-proxy-admin")
        self.set_header("Cache-Control", "no-store")

    def compute_etag(self) -> None:
        return None

    async def get(self) -> None:
        await self._answer(send_body=True)

    async def head(self) -> None:
        await self._answer(send_body=False)

    async def _answer(self, send_body: bool) -> None:
        admin = self.admin
        path = self.request.path
        if not admin.access.allows_host(self.request.headers.get("Host")):
            message = (
                "this Host is not the admin listener's; ask for it by a loopback address, or add the name to "
                "admin_allow_hosts on the proxy."
            )
            self._send(
                HTTPStatus.FORBIDDEN, "application/json", error_body("host_not_allowed", message), send_body
            )
            return
        try:
            if path in _STATIC_FILES:
                name, content_type = _STATIC_FILES[path]
                body = (DASHBOARD_DIR / name).read_bytes()
                self._send(HTTPStatus.OK, content_type, body, send_body)
            elif path == "/stats":
                report = await asyncio.to_thread(admin.read_report)
                self._send(HTTPStatus.OK, "application/json", json.dumps(report).encode(), send_body)
            elif path == "/stats/history":
                self._send(
                    HTTPStatus.OK, "application/json", json.dumps(admin.history.as_json()).encode(), send_body
                )
            elif path == "/metrics":
                metrics = await asyncio.to_thread(render_metrics, admin.read_report)
                self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, metrics, send_body)
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

    def _send(self, status: HTTPStatus, content_type: str, body: bytes, send_body: bool) -> None:
        self.set_status(status)
        self.set_header("Content-Type", content_type)
        self.set_header("Content-Length", str(len(body)))
        if send_body:
            self.write(body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """tornado's own refusals (a bad method, a body where none belongs) in the JSON error shape."""
        self.set_header("Content-Type", "application/json")
        message = f"the admin listener answers GET and HEAD of its pages only ({self._reason})."
        self.finish(error_body("bad_request" if status_code < 500 else "admin_error", message))


class _QuietTornado(logging.Filter):
    """Rewrites tornado's messages about client connections ("Malformed HTTP message from <address>",
    read and write errors, tracebacks of a reset connection) to one debug line that names nobody."""

    _LOGGERS = ("tornado.general", "tornado.access", "tornado.application")

    def __init__(self) -> None:
        super().__init__()
        self._installed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = (
            "admin listener: a client connection ended with an error (details withheld: they name the client)"
        )
        record.args = ()
        record.exc_info = record.exc_text = None
        record.stack_info = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True

    def install(self) -> None:
        if not self._installed:
            for name in self._LOGGERS:
                logging.getLogger(name).addFilter(self)
        self._installed += 1

    def uninstall(self) -> None:
        self._installed = max(0, self._installed - 1)
        if not self._installed:
            for name in self._LOGGERS:
                logging.getLogger(name).removeFilter(self)


_QUIET_TORNADO = _QuietTornado()
