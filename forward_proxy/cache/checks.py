"""The cache's own questions to an upstream service: which version it runs, and whether a KServe model
batches. Both are small GETs that no client asked for.

They go to the address mitmproxy itself connected to for that service (so the egress policy that vetted
that connection holds, and a name is never resolved again), with the service's `Host` header (so a
name-based ingress routes them to the same backend as the clients' requests), over TLS with the trust
settings of mitmproxy's own options (`ssl_insecure`, `ssl_verify_upstream_trusted_ca`, `client_certs`).
The HTTP is Python's `http.client`, run in a worker thread with a timeout. Until mitmproxy has connected
to a service once, there is no address to ask: the cache then learns from the answers it forwards.
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
    address: tuple[str, int]  # the peer address of mitmproxy's connection
    host: str  # the Host header (and the TLS server name) clients use
    sni: str  # the TLS server name (the request's host without port)


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
        sock = socket.create_connection(service.address, timeout=timeout)
        if service.scheme == "https":
            sock = trust.context(service.sni).wrap_socket(sock, server_hostname=service.sni)
        connection.sock = sock
        connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
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
