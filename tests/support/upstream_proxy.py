"""A small forwarding HTTP proxy on an ephemeral loopback port that records every request it was sent.

What `forward-proxy run --mode upstream:http://127.0.0.1:PORT` talks to in a test: it takes absolute-form
requests (`POST http://host:port/path HTTP/1.1`), forwards each to its origin with Python's `http.client`
and relays the answer, every header line as the origin sent it. Like Squid or mitmproxy in regular mode it
refuses a request that is not in absolute form (400), since it would not know where to send it. `CONNECT
host:port` opens a tunnel (recorded as a `CONNECT` with that target), as for an https origin. It
resolves names itself, with the machine's resolver, or as its own hosts file (`hosts`) says.

    with UpstreamProxy() as via:
        ... forward-proxy run --mode upstream:{via.url} ...
        assert via.calls("/v1/embeddings") == 1
        assert via.received()[0].target == "http://127.0.0.1:8000/v1/embeddings"
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from tests.support.serving import ServedInThread

# Hop-by-hop fields (RFC 9110 7.6.1) and the proxy's own: not forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass(frozen=True)
class Forwarded:
    method: str
    target: str  # the request target as sent to this proxy: absolute form, or a path when misdirected
    status: int  # what this proxy answered

    @property
    def path(self) -> str:
        """The target's path without query ("" for a target that is not in absolute form)."""
        parts = urlsplit(self.target)
        return parts.path if parts.scheme else ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        if parts.scheme != "http" or not parts.hostname:
            self._answer(400, [("Content-Type", "text/plain")], b"absolute-form http:// targets only\n")
            return
        address = self.server.recorder.hosts.get(parts.hostname.lower(), parts.hostname)
        origin = http.client.HTTPConnection(address, parts.port or 80, timeout=30)
        try:
            origin.putrequest(
                self.command,
                parts.path + (f"?{parts.query}" if parts.query else ""),
                skip_host=True,
                skip_accept_encoding=True,
            )
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    origin.putheader(name, value)
            origin.putheader("Content-Length", str(len(body)))
            origin.endheaders(body)
            answer = origin.getresponse()
            content = answer.read()
            headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP]
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            self._answer(answer.status, headers, content, answer.reason)
        except OSError as exc:
            self._answer(502, [("Content-Type", "text/plain")], f"cannot reach the origin: {exc}\n".encode())
        finally:
            origin.close()

    def _answer(self, status: int, headers: list[tuple[str, str]], content: bytes, reason: str = "") -> None:
        self.server.recorder._record(Forwarded(self.command, self.path, status))
        self.send_response(status, reason or None)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

    def do_CONNECT(self) -> None:
        """A tunnel to `host:port` (the name mapped by `hosts`), bytes relayed both ways until either
        side closes."""
        host, _, port = self.path.rpartition(":")
        address = self.server.recorder.hosts.get(host.lower(), host).strip("[]")
        try:
            origin = socket.create_connection((address, int(port)), timeout=30)
        except (OSError, ValueError) as exc:
            self._answer(502, [("Content-Type", "text/plain")], f"cannot reach {self.path}: {exc}\n".encode())
            return
        self.server.recorder._record(Forwarded("CONNECT", self.path, 200))
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True

        def pipe(source: socket.socket, sink: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    sink.sendall(data)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pipe, args=(origin, self.connection), daemon=True)
        back.start()
        pipe(self.connection, origin)
        back.join(timeout=30)
        origin.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    recorder: UpstreamProxy


class UpstreamProxy:
    """Forwards absolute-form HTTP requests and records them; `calls(path)` counts those for `path`."""

    def __init__(self, host: str = "127.0.0.1", hosts: dict[str, str] | None = None) -> None:
        """`hosts`: names this proxy resolves itself, to the address given (its own /etc/hosts)."""
        self.host = host
        self.hosts = {name.lower(): address for name, address in (hosts or {}).items()}
        self.port = 0
        self._received: list[Forwarded] = []
        self._lock = threading.Lock()
        self._serving: ServedInThread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> UpstreamProxy:
        server = _Server((self.host, 0), _Handler)
        server.recorder = self
        self.port = int(server.server_address[1])
        self._serving = ServedInThread(server)
        return self

    def stop(self) -> None:
        if self._serving is not None:
            self._serving.stop()
            self._serving = None

    def __enter__(self) -> UpstreamProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def received(self) -> list[Forwarded]:
        with self._lock:
            return list(self._received)

    def calls(self, path: str) -> int:
        return sum(1 for forwarded in self.received() if forwarded.path == path)

    def _record(self, forwarded: Forwarded) -> None:
        with self._lock:
            self._received.append(forwarded)
