"""The cache's own HTTP/1.1 client for the routes it handles, with pooled keep-alive connections.

The cache fetches answers itself (rather than letting mitmproxy forward the request) so that it can
share one upstream call among identical requests, bound the wait with a timeout, fall back to a stale
entry when the upstream fails, and answer failures in the proxy's JSON error shape. Parsing is h11's.

Failures raise `UpstreamError` with a `kind`: "unreachable" (connect failed), "timeout", "protocol"
(the upstream closed the connection or sent something that is not HTTP) or "invalid_request" (the
client's request cannot be sent as HTTP/1.1: a NUL in a header, two Host headers; nothing was sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import h11

Kind = Literal["unreachable", "timeout", "protocol", "invalid_request"]

# Connection-level headers that a proxy must not pass on (RFC 9110 7.6.1), plus the body framing the
# client library sets anew.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
)


class UpstreamError(Exception):
    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class UpstreamResponse:
    status_code: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # lower-case names, hop-by-hop headers removed
    content: bytes
    seconds: float  # from sending the request to the last byte of the answer

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


def outgoing_fields(
    scheme: str, host: str, port: int, method: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> list[tuple[bytes, bytes]]:
    """The header fields sent upstream: the client's without hop-by-hop ones, plus Host and Content-Length."""
    fields = [(name, value) for name, value in headers if name.lower() not in HOP_BY_HOP]
    if not any(name.lower() == b"host" for name, _ in fields):
        default = 443 if scheme == "https" else 80
        fields.insert(0, (b"host", (host if port == default else f"{host}:{port}").encode()))
    if body or method in ("POST", "PUT", "PATCH"):
        fields.append((b"content-length", str(len(body)).encode()))
    return fields


def request_problem(
    scheme: str,
    host: str,
    port: int,
    method: str,
    target: str,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> UpstreamError | None:
    """Why this request cannot be sent as HTTP/1.1 (an "invalid_request" error), or None when it can.

    Checked before a request joins an upstream call in flight, so that one client's malformed headers
    never fail the identical requests of others waiting for the same answer."""
    try:
        fields = outgoing_fields(scheme, host, port, method, headers, body)
        h11.Request(method=method.encode(), target=target.encode(), headers=fields)
    except UnicodeEncodeError:
        return UpstreamError(
            "invalid_request", "the request target has bytes that are not ASCII (percent-encode them)"
        )
    except h11.LocalProtocolError as exc:
        return UpstreamError("invalid_request", f"the request is not valid HTTP/1.1 ({exc})")
    return None


class _Stale(Exception):
    """A pooled connection the server had closed before we used it: safe to retry on a fresh one."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.state = h11.Connection(our_role=h11.CLIENT)
        self.fresh = True

    async def exchange(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[h11.Response, bytes, bool]:
        reused = not self.fresh
        self.fresh = False
        state = self.state
        try:
            data = state.send(h11.Request(method=method, target=target, headers=headers))
        except h11.LocalProtocolError as exc:  # the client's request, not the upstream, is at fault
            raise UpstreamError("invalid_request", f"the request is not valid HTTP/1.1 ({exc})") from None
        if body:
            data += state.send(h11.Data(data=body))  # type: ignore[operator]
        data += state.send(h11.EndOfMessage())  # type: ignore[operator]
        self.writer.write(data)
        await self.writer.drain()
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = state.next_event()
            if event is h11.NEED_DATA:
                received = await self.reader.read(262144)
                if not received and reused and response is None and not chunks:
                    raise _Stale()
                state.receive_data(received)
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise UpstreamError("protocol", "the upstream closed the connection before answering")
        assert response is not None
        # Bytes after the answer's announced end answer no request: reusing the connection would take them
        # for the next request's answer (and cache them under its key).
        done = state.our_state is h11.DONE and state.their_state is h11.DONE
        reusable = done and not state.trailing_data[0]
        if reusable:
            state.start_next_cycle()
        return response, b"".join(chunks), reusable

    def idle_and_open(self) -> bool:
        """Whether this pooled connection may carry the next request: open, and nothing received since its
        last answer (what a server sends unasked would be read as the next request's answer)."""
        unread = getattr(self.reader, "_buffer", b"")  # asyncio.StreamReader has no public peek
        return not self.reader.at_eof() and not self.writer.is_closing() and not unread

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class UpstreamClient:
    def __init__(self, *, max_idle_per_origin: int = 64, verify_tls: bool = True) -> None:
        self.max_idle_per_origin = max_idle_per_origin
        self.verify_tls = verify_tls
        self._idle: dict[tuple[str, str, int, str], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def request(
        self,
        scheme: str,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
        server_name: str | None = None,
    ) -> UpstreamResponse:
        """Send one request and read the whole answer within `timeout` seconds.

        `server_name` is the TLS name to send and verify when `host` is an address the name resolved to."""
        origin = (scheme, host, port, server_name or host)
        fields = outgoing_fields(scheme, host, port, method, headers, body)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                for attempt in range(2):
                    connection = await self._connection(origin)
                    try:
                        response, content, reusable = await connection.exchange(
                            method.encode(), target.encode(), fields, body
                        )
                    except _Stale:
                        connection.close()
                        if attempt == 0:
                            continue
                        raise UpstreamError("protocol", "the upstream closed the connection") from None
                    except BaseException:
                        connection.close()
                        raise
                    if reusable:
                        self._release(origin, connection)
                    else:
                        connection.close()
                    break
        except TimeoutError:
            raise UpstreamError("timeout", f"no complete answer within {timeout:g}s") from None
        except UpstreamError:
            raise
        except (h11.ProtocolError, ssl.SSLError) as exc:
            raise UpstreamError("protocol", f"the upstream's answer is not valid HTTP/1.1 ({exc})") from None
        except ConnectionError as exc:
            raise UpstreamError("protocol", f"the connection broke ({exc.strerror or exc})") from None
        elapsed = time.perf_counter() - started
        kept = tuple(
            (bytes(name), bytes(value)) for name, value in response.headers if bytes(name) not in HOP_BY_HOP
        )
        return UpstreamResponse(response.status_code, bytes(response.reason), kept, content, elapsed)

    async def _connection(self, origin: tuple[str, str, int, str]) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.idle_and_open():
                return connection
            connection.close()
        scheme, host, port, server_name = origin
        tls = scheme == "https"
        try:
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=self._tls_context() if tls else None,
                server_hostname=server_name if tls else None,
                limit=2**20,
            )
        except OSError as exc:
            # asyncio's strerror is "Connect call failed (address)": name the cause ("Connection refused")
            cause = os.strerror(exc.errno) if exc.errno else str(exc)
            raise UpstreamError("unreachable", f"cannot connect to {host}:{port} ({cause})") from None
        return _Connection(reader, writer)

    def _release(self, origin: tuple[str, str, int, str], connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self.max_idle_per_origin:
            idle.append(connection)
        else:
            connection.close()

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            context = ssl.create_default_context()
            with contextlib.suppress(ImportError):
                import certifi

                context.load_verify_locations(certifi.where())
            if not self.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["http/1.1"])
            self._tls = context
        return self._tls

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
