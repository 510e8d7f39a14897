"""A raw-socket HTTP/1.1 client for requests no well-behaved library would send.

    answer = send_raw(proxy.host, proxy.port, b"GET http://127.0.0.1:9/ HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    answer.status       # 400, or None when the proxy closed the connection without answering
    answer.json()       # the body parsed as JSON

`send_raw` writes the bytes as they are (nothing is added or fixed), then reads one response: the status
line, the headers and a body framed by Content-Length or chunked encoding, else read until the peer
closes. Everything is bounded by a timeout, so a test never hangs on a proxy that keeps silent.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

CLOSE_WAIT_SECONDS = 2.0  # how long to wait for the close a `Connection: close` answer announces


@dataclass
class RawResponse:
    status: int | None  # None: the connection closed (or timed out) before a status line arrived
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    closed: bool = False  # the peer closed the connection after (or instead of) answering

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """One client connection to `host:port` on which bytes are sent as they are."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self._buffer = b""
        self._eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Whether the peer closes the connection within `timeout` seconds (any bytes it sends are read)."""
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            self._fill(deadline)
        return self._eof

    def read_response(self, timeout: float | None = None) -> RawResponse:
        """Read one response; a status of None means the peer closed or went silent before answering."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        head = self._read_until(b"\r\n\r\n", deadline)
        if head is None:
            return RawResponse(None, closed=self._eof)
        lines = head.decode("latin-1").split("\r\n")
        _, status, reason = [*lines[0].split(" ", 2), "", ""][:3]
        headers = [
            (name.strip(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        ]
        response = RawResponse(int(status), reason, headers)
        length = response.header("content-length")
        if length is not None:
            response.body = self._read_exactly(int(length), deadline)
        elif "chunked" in (response.header("transfer-encoding") or "").lower():
            response.body = self._read_chunked(deadline)
        else:
            while not self._eof and time.monotonic() < deadline:
                self._fill(deadline)
            response.body, self._buffer = self._buffer, b""
        if (response.header("connection") or "").lower() == "close":  # see whether it does, briefly
            self.is_closed_by_peer(min(CLOSE_WAIT_SECONDS, max(0.0, deadline - time.monotonic())))
        response.closed = self._eof
        return response

    # --- reading ---------------------------------------------------------------------------------

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except OSError:  # reset by the peer: as closed as it gets
            data = b""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def _read_until(self, marker: bytes, deadline: float) -> bytes | None:
        while marker not in self._buffer:
            if self._eof or time.monotonic() >= deadline:
                return None
            self._fill(deadline)
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        while len(self._buffer) < size and not self._eof and time.monotonic() < deadline:
            self._fill(deadline)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _read_chunked(self, deadline: float) -> bytes:
        body = b""
        while True:
            line = self._read_until(b"\r\n", deadline)
            if line is None:
                return body
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                self._read_until(b"\r\n", deadline)
                return body
            body += self._read_exactly(size, deadline)
            self._read_until(b"\r\n", deadline)


def send_raw(host: str, port: int, data: bytes, timeout: float = 10.0) -> RawResponse:
    """Send `data` on a fresh connection, read one response, close."""
    with RawConnection(host, port, timeout) as connection:
        with contextlib.suppress(OSError):  # the peer closed before taking everything: read what it said
            connection.send(data)
        return connection.read_response()


def request_bytes(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    content_length: bool = True,
    version: str = "HTTP/1.1",
) -> bytes:
    """A request as bytes, exactly as given (Content-Length added from `body` unless told otherwise)."""
    fields = list(headers or [])
    if content_length and body and not any(name.lower() == "content-length" for name, _ in fields):
        fields.append(("Content-Length", str(len(body))))
    head = f"{method} {target} {version}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields)
    return head.encode("latin-1") + b"\r\n" + body
