"""The cache's own questions to an upstream service: which version it runs, and whether a KServe model
batches. Both are small GETs that no client asked for.

They go to the address mitmproxy itself connected to for that service (so the egress policy that vetted
that connection holds, and a name is never resolved again), with the service's `Host` header (so a
name-based ingress routes them to the same backend as the clients' requests), over TLS with the trust
settings of mitmproxy's own options (`ssl_insecure`, `ssl_verify_upstream_trusted_ca`, `client_certs`).
In upstream mode (`--mode upstream:URL`) they go where mitmproxy sends the clients' requests: through
the upstream proxy (absolute-form for http, a CONNECT tunnel for https), which resolves the name, never
this process. The HTTP is Python's `http.client`, run in a worker thread with a timeout. Until mitmproxy
has connected to a service once, there is no address to ask: the cache then learns from the answers it
forwards.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Service:
    """Where one upstream service lives: the address mitmproxy connected to and the name it answers to."""

    scheme: str  # "http" or "https"
    address: tuple[str, int]  # the peer address of mitmproxy's connection (upstream mode: the origin)
    host: str  # the Host header (and the TLS server name) clients use
    sni: str  # the TLS server name (the request's host without port)
    via: tuple[str, int] | None = None  # upstream mode: the upstream proxy mitmproxy goes through
    via_tls: bool = False  # that proxy is spoken to over TLS (`upstream:https://...`)


@dataclass(frozen=True)
class TlsTrust:
    insecure: bool = False
    trusted_ca: str = ""  # a PEM file of CAs (ssl_verify_upstream_trusted_ca)
    trusted_ca_dir: str = ""
    client_certs: str = ""  # a PEM file, or a directory of <host>.pem (mitmproxy's client_certs)

    def context(self, server_name: str) -> ssl.SSLContext:
        context = ssl.create_default_context(
            cafile=self.trusted_ca or None, capath=self.trusted_ca_dir or None
        )
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.client_certs:
            path = Path(self.client_certs).expanduser()
            chosen = path / f"{server_name}.pem" if path.is_dir() else path
            if chosen.is_file():
                context.load_cert_chain(str(chosen))
        return context


@dataclass(frozen=True)
class CheckAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        return ", ".join(values) if values else None


class CheckFailed(Exception):
    """The service could not be asked (refused, timed out, TLS failed)."""


async def ask(
    service: Service, path: str, headers: list[tuple[str, str]], timeout: float, trust: TlsTrust
) -> CheckAnswer:
    """`GET path` of `service`; raises `CheckFailed` with a sentence when it cannot be asked."""
    return await asyncio.to_thread(_ask, service, path, headers, timeout, trust)


def _ask(
    service: Service, path: str, headers: list[tuple[str, str]], timeout: float, trust: TlsTrust
) -> CheckAnswer:
    connection = http.client.HTTPConnection(*service.address, timeout=timeout)
    try:
        target = path
        if service.via is None:
            sock = socket.create_connection(service.address, timeout=timeout)
        else:
            sock = _to_upstream_proxy(service, service.via, timeout, trust)
            if service.scheme != "https":  # an http proxy is sent the absolute form
                target = f"http://{_authority(service.address)}{path}"
        if service.scheme == "https":
            sock = trust.context(service.sni).wrap_socket(sock, server_hostname=service.sni)
        connection.sock = sock
        connection.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", service.host)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return CheckAnswer(response.status, response.getheaders(), response.read(1 << 20))
    except (OSError, http.client.HTTPException, ValueError) as exc:  # ssl.SSLError is an OSError
        raise CheckFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()


def _authority(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _to_upstream_proxy(
    service: Service, via: tuple[str, int], timeout: float, trust: TlsTrust
) -> socket.socket:
    """A socket to the upstream proxy; for an https service, tunnelled to it with CONNECT."""
    sock = socket.create_connection(via, timeout=timeout)
    if service.via_tls:
        sock = trust.context(via[0]).wrap_socket(sock, server_hostname=via[0])
    if service.scheme != "https":
        return sock
    authority = _authority(service.address)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk or len(head) > 65536:
            sock.close()
            raise OSError("the upstream proxy closed the CONNECT tunnel")
        head += chunk
    status_line = head.split(b"\r\n", 1)[0]
    status = status_line.split()
    if len(status) < 2 or not status[1].startswith(b"2"):
        sock.close()
        raise OSError(f"the upstream proxy refused CONNECT {authority}: {status_line.decode('latin-1')}")
    return sock
