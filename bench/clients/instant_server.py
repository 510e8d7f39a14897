"""A loopback HTTP server that answers every request at once with the same stored bytes: what a client
costs on its own, with nothing in the way (bench_clients.py's `floor` rows).

    python bench/clients/instant_server.py PORT ANSWER_FILE

Every request (absolute form too, so clients can use it as their proxy) gets `200 OK` with ANSWER_FILE's
bytes as a JSON body and `X-Cache: HIT`. Like `forward-proxy run` it sets `TCP_NODELAY` and re-arms
`TCP_QUICKACK` after every read (Linux), so a client that leaves Nagle on never waits for a delayed ACK.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class Instant(asyncio.Protocol):
    answer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.buffer = transport, b""
        self.sock = transport.get_extra_info("socket")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if QUICKACK is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(self.answer)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Instant, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    port, body = int(sys.argv[1]), Path(sys.argv[2]).read_bytes()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Cache: HIT\r\nContent-Length: {len(body)}\r\n\r\n"
    Instant.answer = head.encode() + body
    asyncio.run(serve(port))


if __name__ == "__main__":
    main()
