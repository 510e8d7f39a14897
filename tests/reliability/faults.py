"""A misbehaving model API on an ephemeral loopback port: each path answers with one fault.

`tests.support.upstream.Upstream` answers in well-formed HTTP (an HTTP server library writes it); the
faults here need the raw socket: answers that hang, stop half-way, are not HTTP, or carry more bytes than
they announce. Requests are read on keep-alive connections, so a fault can also leave bytes behind for
the next request on the same connection.

    with FaultyUpstream() as upstream:
        upstream.behave("/v2/models/m/infer", Fault.CLOSE_MID_BODY)
        ...
        assert upstream.calls("/v2/models/m/infer") == 1

Paths without a fault get `healthy_answer(path, body)`: 200 JSON that depends only on the request, so a
test can tell whether what the proxy served is what this upstream answers to that request.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from typing import Any

from tests.support.serving import ServedInThread

MODEL_VERSION = "v1"
HANG_SECONDS = 60.0  # a hanging answer gives up after this, or when the server stops
DRIBBLE_SECONDS = 0.25  # between the bytes of a dribbled answer
UNASKED_DELAY = 0.2  # seconds between an answer and the forged one sent after it
SLOW_SECONDS = 1.5


class Fault(enum.Enum):
    HANG = "reads the request and never answers"
    HANG_AFTER_HEAD = "sends the status line and headers, then nothing"
    DRIBBLE = "sends a valid answer one byte every quarter second, slower than any timeout here"
    CLOSE_BEFORE_ANSWER = "reads the request and closes the connection without a byte"
    RESET = "reads the request and resets the connection (TCP RST)"
    CLOSE_MID_BODY = "announces a Content-Length, sends half the body, closes"
    TRUNCATED_CHUNKED = "sends one chunk of a chunked body, closes before the last chunk"
    GARBAGE = "answers with bytes that are not HTTP"
    BAD_STATUS_LINE = "answers with a status line without a status code"
    BAD_CONTENT_LENGTH = "answers with a Content-Length that is not a number"
    OVERLONG_BODY = (
        "sends more bytes than its Content-Length: a second, forged answer follows on the connection"
    )
    UNASKED_ANSWER = "answers, then sends a second, forged answer on the idle connection a moment later"
    HTTP_503_HTML = "answers 503 with an HTML page, as a load balancer in front of the model does"
    INVALID_JSON = "answers 200 application/json with half its JSON body (well framed: Content-Length fits)"
    SLOW = "answers like a healthy path, after SLOW_SECONDS (not a fault: keeps requests in flight)"


def healthy_answer(path: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    """What this upstream answers to `body` on a path without a fault (the same every time): its JSON
    content and extra headers. `/v1/embeddings` answers in OpenAI's shape with `X-Input-Tokens`, so the
    proxy caches it row by row; other paths echo the request."""
    try:
        document: Any = json.loads(body) if body else None
    except ValueError:
        document = body.decode(errors="replace")
    if path == "/v1/embeddings" and isinstance(document, dict):
        texts = document.get("input")
        texts = [texts] if isinstance(texts, str) else texts if isinstance(texts, list) else []
        tokens = [max(1, len(str(text).split())) for text in texts]
        data = [
            {"object": "embedding", "index": index, "embedding": _vector(str(text))}
            for index, text in enumerate(texts)
        ]
        usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        answer = {"object": "list", "data": data, "model": document.get("model", "m"), "usage": usage}
        return json.dumps(answer).encode(), {"X-Input-Tokens": ",".join(map(str, tokens))}
    return json.dumps({"path": path, "echo": document, "version": MODEL_VERSION}).encode(), {}


def healthy_json(path: str, body: Any) -> Any:
    """The JSON document of `healthy_answer` for the JSON request `body`."""
    content, _ = healthy_answer(path, json.dumps(body).encode())
    return json.loads(content)


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255, 4) for byte in digest[:8]]


def _response(
    status: str, content: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json"
) -> bytes:
    lines = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(content)}",
        f"X-Model-Version: {MODEL_VERSION}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + content


FORGED = b'{"forged": "an answer to nobody\'s request"}'


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        connection: socket.socket = self.request
        connection.settimeout(HANG_SECONDS)
        buffered = b""
        with contextlib.suppress(OSError):
            while True:
                request = _read_request(connection, buffered)
                if request is None:
                    return
                path, body, buffered = request
                fault = self.server.upstream._record(path)
                if not self._answer(connection, fault, path, body):
                    return

    def _answer(self, connection: socket.socket, fault: Fault | None, path: str, body: bytes) -> bool:
        """Answer one request; whether the connection stays open for the next one."""
        stopping = self.server.upstream._stopping
        content, headers = healthy_answer(path, body)
        whole = _response("200 OK", content, headers)
        if fault is None:
            connection.sendall(whole)
            return True
        if fault is Fault.HANG:
            stopping.wait(HANG_SECONDS)
        elif fault is Fault.HANG_AFTER_HEAD:
            connection.sendall(whole[: -len(content)])
            stopping.wait(HANG_SECONDS)
        elif fault is Fault.DRIBBLE:
            for byte in whole:
                if stopping.wait(DRIBBLE_SECONDS):
                    break
                connection.sendall(bytes([byte]))
        elif fault is Fault.RESET:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()  # now, before socketserver's shutdown(SHUT_WR) would send a FIN first
        elif fault is Fault.CLOSE_MID_BODY:
            connection.sendall(whole[: len(whole) - len(content) // 2])
        elif fault is Fault.TRUNCATED_CHUNKED:
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Model-Version: {MODEL_VERSION}\r\n"
            )
            chunk = content[: len(content) // 2]
            connection.sendall(
                f"{head}Transfer-Encoding: chunked\r\n\r\n{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
            )
        elif fault is Fault.GARBAGE:
            connection.sendall(b"\x00\xffthis is not HTTP at all\r\n\r\n")
        elif fault is Fault.BAD_STATUS_LINE:
            connection.sendall(b"HTTP/1.1 OK\r\nContent-Length: 2\r\n\r\n{}")
        elif fault is Fault.BAD_CONTENT_LENGTH:
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\r\n{}")
        elif fault is Fault.OVERLONG_BODY:
            connection.sendall(whole + _response("200 OK", FORGED))
            return True  # keep the connection: the forged answer waits there for the next request
        elif fault is Fault.UNASKED_ANSWER:
            connection.sendall(whole)
            stopping.wait(UNASKED_DELAY)
            connection.sendall(_response("200 OK", FORGED))
            return True
        elif fault is Fault.INVALID_JSON:
            connection.sendall(_response("200 OK", content[: len(content) // 2], headers))
            return True
        elif fault is Fault.SLOW:
            stopping.wait(SLOW_SECONDS)
            connection.sendall(whole)
            return True
        elif fault is Fault.HTTP_503_HTML:
            page = b"<html><body><h1>503 Service Unavailable</h1></body></html>"
            connection.sendall(_response("503 Service Unavailable", page, content_type="text/html"))
            return True
        return False


def _read_request(connection: socket.socket, buffered: bytes) -> tuple[str, bytes, bytes] | None:
    """(path, body, bytes after it) of the next request on `connection`, or None when it closed."""
    data = buffered
    while b"\r\n\r\n" not in data:
        received = connection.recv(65536)
        if not received:
            return None
        data += received
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    target = lines[0].split(" ")[1]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(rest) < length:
        received = connection.recv(65536)
        if not received:
            return None
        rest += received
    if target.startswith("http://"):  # absolute form
        target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
    return target.split("?", 1)[0], rest[:length], rest[length:]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    upstream: FaultyUpstream


class FaultyUpstream:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._faults: dict[str, Fault] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._serving: ServedInThread | None = None

    def start(self) -> FaultyUpstream:
        server = _Server((self.host, 0), _Handler)
        server.upstream = self
        self.port = int(server.server_address[1])
        self._stopping.clear()
        self._serving = ServedInThread(server)
        return self

    def stop(self) -> None:
        """Stop listening and release every hanging answer (their connections then close)."""
        self._stopping.set()
        if self._serving is not None:
            self._serving.stop()
            self._serving = None

    def __enter__(self) -> FaultyUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.origin + path

    def behave(self, path: str, fault: Fault | None) -> None:
        """Answer requests to `path` with `fault` from now on (None: healthy); "*" stands for every path
        without a fault of its own (a model API that hangs as a whole)."""
        with self._lock:
            if fault is None:
                self._faults.pop(path, None)
            else:
                self._faults[path] = fault

    def calls(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    def wait_for_calls(self, path: str, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.calls(path) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} got {self.calls(path)} calls, not {count}, within {timeout}s")
            time.sleep(0.02)

    def _record(self, path: str) -> Fault | None:
        with self._lock:
            self._counts[path] += 1
            return self._faults.get(path, self._faults.get("*"))
