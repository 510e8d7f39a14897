"""Connections without the delayed-ACK stall: `TCP_NODELAY` on every socket the proxy writes to, and quick
ACKs on every socket it reads from (Linux).

Why: a client that leaves Nagle's algorithm on sends a small request in two segments, the head and then
the body, and holds the body back until the head is acknowledged. The receiving kernel delays that
acknowledgement by up to 40 ms (it hopes to piggyback it on an answer, which cannot come before the body).
urllib3, and so every `requests` Session, leaves Nagle on for connections to a proxy on purpose (urllib3
#2936), so without this module each request of such a client waits about 40 ms: a cache hit would cost
more than computing the answer. The same holds on the upstream side for a server that writes an answer's
head and body separately.

What: for each TCP connection mitmproxy opens or accepts (`client_connected`, `server_connected`), this
addon sets `TCP_NODELAY` (asyncio already does; this keeps it true whatever a future mitmproxy does) and,
on Linux, sets `TCP_QUICKACK` and re-arms it after every read. The kernel leaves quick-ACK mode on its own
whenever a connection looks interactive, so once is not enough; set after a read, it also sends at once
an acknowledgement the kernel was holding back. One `setsockopt` per read costs about a microsecond.

How: mitmproxy 12 runs each connection over asyncio streams. The connection's `StreamWriter` is found
through the proxyserver addon (`Proxyserver.connections[client.id].transports[connection].writer`), and
a thin protocol is put in front of the transport's own (`transport.set_protocol`) that re-arms quick ACKs
before handing each read on. This is the one module that reaches into mitmproxy's connection handler:
when an upgrade moves it, the addon logs one warning and the proxy runs as before, only with the stall,
and `tests/forward_proxy/test_sockets.py` fails.

Other systems: `TCP_QUICKACK` exists on Linux only; elsewhere the addon sets `TCP_NODELAY` and nothing
else (a client with Nagle on may then wait for the system's delayed ACK, commonly 40 to 200 ms; such
clients should turn Nagle off themselves, see docs/client.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import mitmproxy_rs
from mitmproxy import connection, ctx
from mitmproxy.proxy import server_hooks

log = logging.getLogger(__name__)

# None where the system has no quick-ACK mode (everything but Linux).
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class QuickAckProtocol(asyncio.Protocol):
    """In front of a transport's protocol: re-arms `TCP_QUICKACK` on each read, then hands it on."""

    def __init__(self, inner: asyncio.Protocol, sock: Any, quickack: int) -> None:
        self.inner = inner
        self.sock = sock  # the transport's socket (asyncio's TransportSocket)
        self.quickack = quickack  # socket.TCP_QUICKACK

    def rearm(self) -> None:
        try:  # noqa: SIM105 (once per read: a plain try is the cheaper)
            self.sock.setsockopt(socket.IPPROTO_TCP, self.quickack, 1)
        except OSError:
            pass  # the connection is closing; the read that follows says so

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.rearm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def stream_writer(client: connection.Client, conn: connection.Connection) -> object:
    """The object mitmproxy writes `conn` with (an asyncio `StreamWriter` for TCP), `conn` being a
    connection of `client`'s handler. LookupError (or AttributeError, after an upgrade that moved it)
    where it cannot be found."""
    proxyserver: Any = ctx.master.addons.get("proxyserver")
    if proxyserver is None:
        raise LookupError("no proxyserver addon")
    return proxyserver.connections[client.id].transports[conn].writer


def tune(writer: asyncio.StreamWriter) -> bool:
    """Set `TCP_NODELAY`, and on Linux quick ACKs re-armed after each read, on `writer`'s connection.
    False where it is not a TCP socket. Idempotent."""
    sock = writer.get_extra_info("socket")
    if (
        sock is None
        or sock.family not in (socket.AF_INET, socket.AF_INET6)
        or sock.type != socket.SOCK_STREAM
    ):
        return False
    transport = writer.transport
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if TCP_QUICKACK is not None and not isinstance(transport.get_protocol(), QuickAckProtocol):
            quick = QuickAckProtocol(transport.get_protocol(), sock, TCP_QUICKACK)  # type: ignore[arg-type]
            transport.set_protocol(quick)
            quick.rearm()  # a request already read before this hook runs gets its ACK now
    except OSError:
        return False  # closed while connecting; nothing to tune
    return True


class Sockets:
    """Tunes each client and server connection at connect time (see the module's docstring)."""

    def __init__(self) -> None:
        self.warned = False

    def client_connected(self, client: connection.Client) -> None:
        if client.transport_protocol == "tcp":
            self._tune(client, client)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.transport_protocol == "tcp":
            self._tune(data.client, data.server)

    def _tune(self, client: connection.Client, conn: connection.Connection) -> None:
        try:
            writer = stream_writer(client, conn)
        except LookupError:
            return  # not served by mitmproxy's proxyserver (tests), or already closed
        except AttributeError as exc:
            self._warn(f"{type(exc).__name__}: {exc}")
            return
        if isinstance(writer, asyncio.StreamWriter):
            tune(writer)
        elif not isinstance(writer, mitmproxy_rs.Stream):
            # mitmproxy_rs streams (WireGuard, local and TUN modes) have no socket of ours to tune.
            self._warn(f"the connection is written with {type(writer).__name__}")

    def _warn(self, reason: str) -> None:
        if not self.warned:
            self.warned = True
            log.warning(
                "sockets: cannot reach a connection's socket (%s); clients that leave Nagle on, such as "
                "requests, wait about 40 ms per request. Report this with the mitmproxy version.",
                reason,
            )
