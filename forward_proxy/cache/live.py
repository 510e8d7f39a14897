"""Streams shared live: a request identical to one whose answer is still streaming follows that stream.

mitmproxy sends an answer an addon made in one piece; only an answer that comes from a server passes
event by event. So a waiter is not answered by an addon: its flow is sent by mitmproxy, like any
exchange, to a small HTTP server inside the proxy process (`LiveRelay`, loopback, an ephemeral port,
one unguessable path per stream) that writes the leader's stream as it grows: every event so far at
once, then each new one as the upstream sends it. The waiter's client sees an ordinary streamed answer,
with the leader's status and headers; one generation upstream, however many follow it.

A stream that ends cut short ends the same way for its followers (the relay aborts the connection
before the last chunk, so the client sees an incomplete answer, never a made-up end). A finished
stream stays readable for `linger` seconds, so a waiter whose connection to the relay arrives late still
gets all of it.

The relay speaks HTTP/1.1 through h11 (the HTTP library mitmproxy itself uses) and answers one request
per connection. `INTERNAL` holds the relay's addresses: the egress policy lets mitmproxy connect there
whatever the destination rules say, since no byte leaves the process's host.

>>> import asyncio
>>> async def demo():
...     live = LiveStream(200, b"OK", [(b"content-type", b"text/event-stream")])
...     live.append(b"data: 1\\n\\n")
...     seen = []
...     async def follow():
...         async for chunk in live.follow():
...             seen.append(chunk)
...     task = asyncio.create_task(follow())
...     await asyncio.sleep(0)
...     live.append(b"data: [DONE]\\n\\n")
...     live.end(complete=True)
...     await task
...     return b"".join(seen)
>>> asyncio.run(demo())
b'data: 1\\n\\ndata: [DONE]\\n\\n'
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Sequence

import h11

logger = logging.getLogger(__name__)

INTERNAL: set[tuple[str, int]] = set()  # where the relays of this process listen
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te", b"trailer", b"upgrade"}
)
_MAX_REQUEST_HEAD = 64 * 1024


def is_internal(address: tuple[str, int] | None) -> bool:
    """Whether `address` is a live relay of this process (the egress policy does not apply there)."""
    return address is not None and (address[0], address[1]) in INTERNAL


class LiveStream:
    """A streamed answer as it arrives: its head, the bytes so far, and whether it ended (and how)."""

    def __init__(self, status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = [(name, value) for name, value in headers if name.lower() not in _HOP_BY_HOP]
        self.body = bytearray()
        self.ended = False
        self.complete = False
        self._grown = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        if chunk and not self.ended:
            self.body.extend(chunk)
            self._wake()

    def end(self, *, complete: bool) -> None:
        if not self.ended:
            self.ended, self.complete = True, complete
            self._wake()

    def _wake(self) -> None:
        grown, self._grown = self._grown, asyncio.Event()
        grown.set()

    async def follow(self) -> AsyncIterator[bytes]:
        """Everything so far, then each new part as it comes, until the stream ends."""
        sent = 0
        while True:
            if sent < len(self.body):
                chunk = bytes(self.body[sent:])
                sent += len(chunk)
                yield chunk
            elif self.ended:
                return
            else:
                await self._grown.wait()


class LiveRelay:
    """The loopback HTTP server that waiters' flows are sent to (see the module's text)."""

    def __init__(self, *, linger: float = 60.0) -> None:
        self.linger = linger
        self._streams: dict[str, LiveStream] = {}
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None

    async def address(self) -> tuple[str, int]:
        """Where the relay listens (it starts on first use)."""
        if self._address is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            host, port = self._server.sockets[0].getsockname()[:2]
            self._address = (host, port)
            INTERNAL.add(self._address)
        return self._address

    def share(self, stream: LiveStream) -> str:
        """The path under which the relay serves `stream`; it is dropped `linger` seconds after it ended."""
        path = f"/live/{secrets.token_urlsafe(18)}"
        self._streams[path] = stream

        async def drop_when_ended() -> None:
            async for _ in stream.follow():
                pass
            await asyncio.sleep(self.linger)
            self._streams.pop(path, None)

        task = asyncio.get_running_loop().create_task(drop_when_ended(), name="live stream")
        task.add_done_callback(lambda _: self._streams.pop(path, None))
        return path

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._address is not None:
            INTERNAL.discard(self._address)
        self._server, self._address = None, None
        self._streams.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_HEAD)
        try:
            request = await _read_request(reader, connection)
            stream = self._streams.get(request.target.decode("ascii", "replace")) if request else None
            if stream is None:
                writer.write(
                    connection.send(h11.Response(status_code=404, headers=[(b"content-length", b"0")]))
                )
                writer.write(connection.send(h11.EndOfMessage()))
                return
            head = h11.Response(
                status_code=stream.status,
                reason=stream.reason,
                headers=[*stream.headers, (b"transfer-encoding", b"chunked"), (b"connection", b"close")],
            )
            writer.write(connection.send(head))
            async for chunk in stream.follow():
                writer.write(connection.send(h11.Data(data=chunk)))
                await writer.drain()
            if stream.complete:
                writer.write(connection.send(h11.EndOfMessage()))
                await writer.drain()
            else:
                writer.transport.abort()  # cut short, as the leader's was: no chunked end
        except (ConnectionError, h11.ProtocolError) as exc:
            logger.debug(f"live relay: {exc}")
        finally:
            writer.close()


async def _read_request(reader: asyncio.StreamReader, connection: h11.Connection) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            connection.receive_data(data)
            if not data:
                return None
        else:
            return None
