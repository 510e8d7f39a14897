"""Clients bound to chosen loopback source addresses, and a recording TLS upstream, for the privacy and
policy integration tests (which run the real `forward-proxy run` / `mitmdump` processes).

`requests` cannot choose its source address, so the clients here use `http.client` (absolute-form request
lines, as an HTTP proxy expects them) and raw sockets for CONNECT.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.processes import ManagedProcess, console_script, free_port, running, wait_for_port

# Every header of the issue that can identify a client, with values that would give one away.
IDENTITY_HEADERS: dict[str, str] = {
    "Forwarded": "for=203.0.113.7;proto=http;by=203.0.113.1",
    "X-Forwarded-For": "203.0.113.7, 198.51.100.9",
    "X-Forwarded-Host": "laptop-203-0-113-7.corp.example",
    "X-Forwarded-Proto": "http",
    "X-Forwarded-Port": "40000",
    "X-Forwarded-Server": "edge-203-0-113-7",
    "X-Real-IP": "203.0.113.7",
    "X-Client-IP": "203.0.113.7",
    "X-Originating-IP": "[203.0.113.7]",
    "True-Client-IP": "203.0.113.7",
    "Client-IP": "203.0.113.7",
    "CF-Connecting-IP": "203.0.113.7",
    "Fastly-Client-IP": "203.0.113.7",
    "X-Cluster-Client-IP": "203.0.113.7",
    "Via": "1.1 laptop-203-0-113-7",
    "Proxy-Connection": "keep-alive",
    "Proxy-Authorization": "Basic " + base64.b64encode(b"mallory:guess").decode(),
    "X-Client-Pseudonym": "c-forged000000000",
}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers.items() if key.lower() == name.lower()), None)


def http_request(
    proxy_host: str,
    proxy_port: int,
    url: str,
    *,
    source: str = "127.0.0.1",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> Answer:
    """One request through the proxy from `source`, with `url` as the absolute-form request target."""
    connection = http.client.HTTPConnection(
        proxy_host, proxy_port, timeout=timeout, source_address=(source, 0)
    )
    try:
        connection.request(method, url, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


@dataclass
class Tunnel:
    status: int
    head: bytes
    body: bytes
    sock: socket.socket | None  # open when status is 200


def open_tunnel(
    proxy_host: str,
    proxy_port: int,
    target: str,
    *,
    source: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Tunnel:
    """Send `CONNECT target` from `source`; return the proxy's answer and, on 200, the open socket."""
    sock = socket.create_connection((proxy_host, proxy_port), timeout=timeout, source_address=(source, 0))
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    if status != 200:
        length = _content_length(head)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        sock.close()
        return Tunnel(status, head, body, None)
    return Tunnel(status, head, body, sock)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def https_get_through(
    tunnel: Tunnel, server_name: str, cafile: Path, path: str, headers: dict[str, str]
) -> Answer:
    """Speak TLS (verifying `server_name` against `cafile`) and one HTTP/1.1 GET inside an open tunnel."""
    assert tunnel.sock is not None
    context = ssl.create_default_context(cafile=str(cafile))
    with context.wrap_socket(tunnel.sock, server_hostname=server_name) as tls:
        request = [f"GET {path} HTTP/1.1", f"Host: {server_name}", "Connection: close"]
        request += [f"{name}: {value}" for name, value in headers.items()]
        tls.sendall(("\r\n".join(request) + "\r\n\r\n").encode())
        raw = b""
        while chunk := tls.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    fields = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
    return Answer(status, fields, body)


def self_signed_certificate(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A certificate for DNS name `name` only (no IP address): (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@dataclass
class Seen:
    path: str
    headers: list[tuple[str, str]]
    sni: str | None


@dataclass
class TlsUpstream:
    """An HTTPS server on 127.0.0.1 (certificate for "localhost") that records what it receives."""

    cert: Path
    key: Path
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    @contextmanager
    def running(self) -> Iterator[TlsUpstream]:
        upstream = self
        server_names: dict[int, str | None] = {}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                sni = server_names.get(id(self.connection))
                upstream.seen.append(Seen(self.path, list(self.headers.items()), sni))
                body = b'{"tls": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert), str(self.key))

        def remember_sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
            server_names[id(sock)] = name

        context.sni_callback = remember_sni  # type: ignore[assignment]
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = int(server.server_address[1])
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


@dataclass
class Mitmdump:
    host: str
    port: int
    process: ManagedProcess

    def log(self) -> str:
        return self.process.log()


@contextmanager
def mitmdump(tmp_path: Path, *settings: str) -> Iterator[Mitmdump]:
    """`mitmdump -s forward_proxy/addons.py` on a free loopback port: the proxy with mitmdump's verbose
    output (every connection and flow), which `forward-proxy run` keeps quiet."""
    port = free_port()
    argv = [
        console_script("mitmdump"),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "-s",
        "forward_proxy/addons.py",
        "--set",
        f"confdir={tmp_path / 'confdir'}",
        "--set",
        f"cache_dir={tmp_path / 'cache'}",
        *settings,
    ]
    process = ManagedProcess(argv, tmp_path / f"mitmdump-{port}.log")
    with running(process):
        wait_for_port("127.0.0.1", port, timeout=60, proc=process.proc)
        yield Mitmdump("127.0.0.1", port, process)
