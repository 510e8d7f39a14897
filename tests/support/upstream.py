"""A small threaded HTTP/1.1 upstream on an ephemeral loopback port that counts its calls.

Each test tells it how to answer a path with a `Reply` (status, body, headers, X-Model-Version, delay,
Cache-Control, Set-Cookie, closing mid-response, ...) and reads back what it received: `calls(path)`
counts, `received(path)` records method, path, headers, body and client address.

    with Upstream(model_version="v1") as upstream:
        upstream.reply("/v1/embeddings", Reply(headers={"Cache-Control": "no-store"}))
        ...
        assert upstream.calls("/v1/embeddings") == 1

The default answer is 200 JSON `{"path": ..., "call": N, "body": <request body>, "version": ...}`, so two
upstream calls never return the same bytes, and it carries `X-Model-Version` when the upstream has one.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.serving import ServedInThread


@dataclass(frozen=True)
class Received:
    method: str
    path: str  # path and query, as sent
    headers: list[tuple[str, str]]
    body: bytes
    client_address: str
    call: int  # 1 for the first call to this path

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


@dataclass
class Reply:
    """How to answer: a fixed `body` or `body(received) -> bytes`; None means the default JSON echo."""

    status: int = 200
    body: bytes | Callable[[Received], bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay: float = 0.0  # seconds before answering
    close_mid_response: bool = False  # send the head and half the body, then close the connection
    model_version: str | None = "inherit"  # "inherit": the upstream's current version
    header_lines: Sequence[tuple[str, str]] = ()  # sent as given: a name may repeat


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path_only = self.path.split("?", 1)[0]
        upstream = self.server.upstream
        received, reply = upstream._record(self.command, self.path, list(self.headers.items()), body, self)
        if reply.delay:
            time.sleep(reply.delay)
        content = upstream._content(reply, received, path_only)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        version = upstream.model_version if reply.model_version == "inherit" else reply.model_version
        version = upstream.host_versions.get(self.headers.get("Host", ""), version)
        if version is not None:
            self.send_header("X-Model-Version", version)
        for name, value in [*reply.headers.items(), *reply.header_lines]:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if reply.close_mid_response:
            self.wfile.write(content[: len(content) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    upstream: Upstream

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        with self.connections_lock:
            self.open_connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Close kept-alive connections too, as a process that exits would."""
        with self.connections_lock:
            connections = list(self.open_connections)
            self.open_connections.clear()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()


def self_signed_certificate(directory: Path, names: Sequence[str] = ("localhost", "127.0.0.1")) -> Path:
    """Write a self-signed certificate and its key for `names` into one PEM file; return its path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternative: list[x509.GeneralName] = []
    for name in names:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "upstream-cert.pem"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        + certificate.public_bytes(serialization.Encoding.PEM)
    )
    return path


class Upstream:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        model_version: str | None = "v1",
        certificate: Path | None = None,
        client_ca: Path | None = None,
    ) -> None:
        """`certificate`: a PEM file with certificate and key (see `self_signed_certificate`) to serve HTTPS;
        `client_ca`: require a client certificate signed by it (mutual TLS)."""
        self.host = host
        self.port = port
        self.model_version = model_version
        self.certificate = certificate
        self.client_ca = client_ca
        self.host_versions: dict[str, str] = {}  # Host header -> X-Model-Version (name-based services)
        self._replies: dict[str, Reply] = {}
        self._default = Reply()
        self._counts: Counter[str] = Counter()
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._serving: ServedInThread | None = None

    # lifecycle
    def start(self) -> Upstream:
        server = _Server((self.host, self.port), _Handler)
        server.upstream = self
        if self.certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.certificate)
            if self.client_ca is not None:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(self.client_ca)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = int(server.server_address[1])
        self._serving = ServedInThread(server)
        return self

    def stop(self) -> None:
        if self._serving is not None:
            server = self._serving.server
            assert isinstance(server, _Server)
            self._serving.stop()
            server.close_connections()
            self._serving = None

    def restart(self, model_version: str | None = "inherit") -> None:
        """Stop and start again on the same port, optionally as another deployment version."""
        self.stop()
        if model_version != "inherit":
            self.model_version = model_version
        self.start()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # addresses
    @property
    def origin(self) -> str:
        scheme = "https" if self.certificate is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.origin + path

    # behaviour
    def reply(self, path: str, reply: Reply) -> None:
        """Answer requests to `path` (without query) with `reply` from now on."""
        with self._lock:
            self._replies[path] = reply

    def default(self, reply: Reply) -> None:
        with self._lock:
            self._default = reply

    # what happened
    def calls(self, path: str | None = None) -> int:
        with self._lock:
            return sum(self._counts.values()) if path is None else self._counts[path]

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self._received if path is None or r.path.split("?", 1)[0] == path]

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
            self._received.clear()

    # used by the handler
    def _record(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, handler: _Handler
    ) -> tuple[Received, Reply]:
        path_only = path.split("?", 1)[0]
        with self._lock:
            self._counts[path_only] += 1
            received = Received(
                method, path, headers, body, handler.client_address[0], self._counts[path_only]
            )
            self._received.append(received)
            return received, self._replies.get(path_only, self._default)

    def _content(self, reply: Reply, received: Received, path: str) -> bytes:
        if callable(reply.body):
            return reply.body(received)
        if reply.body is not None:
            return reply.body
        try:
            echoed: Any = json.loads(received.body) if received.body else None
        except ValueError:
            echoed = received.body.decode(errors="replace")
        document = {"path": path, "call": received.call, "body": echoed, "version": self.model_version}
        return json.dumps(document).encode()
