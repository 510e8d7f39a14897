"""In-test stand-ins on loopback ephemeral ports: a fake model API and a tiny caching HTTP proxy.

The fake model API speaks just enough of both protocols, with vectors a test can compute by hand: the
embedding of a text is its count of each letter a-z (26 dimensions). Its tensor model "digits" answers
with one-hot scores whose class is the label of the built-in sample the row equals, else the row's first
value modulo 10.

The fake proxy takes absolute-form requests (`POST http://127.0.0.1:P/path`) as `HTTP_PROXY` makes
requests send them, forwards them without any proxy, and adds `X-Cache: MISS` the first time it sees a
(method, URL, body) and `X-Cache: HIT` (answering from memory) after that. It refuses every `CONNECT` (HTTPS tunnel) with 403.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DIGITS = json.loads((Path(__file__).resolve().parents[2] / "client_app/data/digits.json").read_text())
SAMPLE_LABELS = {tuple(float(v) for v in s["pixels"]): int(s["label"]) for s in DIGITS["samples"]}


def letter_vector(text: str) -> list[float]:
    lowered = text.lower()
    return [float(lowered.count(chr(ord("a") + i))) for i in range(26)]


def digit_class(row: list[float]) -> int:
    return SAMPLE_LABELS.get(tuple(row), int(row[0]) % 10)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeModelApi:
    """Set `failures[path] = (status, body)` to make a route fail, `delay` to make every answer slow."""

    failures: dict[str, tuple[int, Any]] = field(default_factory=dict)
    delay: float = 0.0
    input_shape: list[int] = field(default_factory=lambda: [-1, 64])
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path in self.failures:
            return self.failures[path]
        if method == "POST" and path == "/v1/embeddings":
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [
                {"object": "embedding", "index": i, "embedding": letter_vector(t)}
                for i, t in enumerate(texts)
            ]
            data.reverse()  # clients must order by `index`, not by position
            tokens = sum(len(t.split()) for t in texts)
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return 200, {"object": "list", "data": data, "model": body.get("model"), "usage": usage}
        if method == "GET" and path == "/v2/models/digits":
            return 200, {
                "name": "digits",
                "versions": ["1"],
                "platform": "pytorch_torchscript",
                "inputs": [{"name": "pixels", "datatype": "FP32", "shape": self.input_shape}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
            }
        if method == "POST" and path == "/v2/models/digits/infer":
            tensor = body["inputs"][0]
            rows = tensor["shape"][0]
            width = len(tensor["data"]) // rows
            scores: list[float] = []
            for r in range(rows):
                label = digit_class(tensor["data"][r * width : (r + 1) * width])
                scores.extend(1.0 if k == label else 0.0 for k in range(10))
            return 200, {
                "model_name": "digits",
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [rows, 10], "data": scores}],
            }
        return 404, {"error": {"code": "not_found", "message": f"no route {method} {path}"}}


class _ApiHandler(BaseHTTPRequestHandler):
    server: _Server

    def _handle(self) -> None:
        fake: FakeModelApi = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        fake.requests.append(Recorded(self.command, self.path, dict(self.headers), body))
        if fake.delay:
            time.sleep(fake.delay)
        status, answer = fake.answer(self.command, self.path, body)
        payload = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(answer, bytes) else "text/html")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Model-Version", "fake-1")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class FakeProxy:
    seen: list[str] = field(default_factory=list)
    cache: dict[tuple[str, str, bytes], tuple[int, list[tuple[str, str]], bytes]] = field(
        default_factory=dict
    )
    url: str = ""


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _Server

    def _handle(self) -> None:
        proxy: FakeProxy = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        proxy.seen.append(f"{self.command} {self.path}")
        key = (self.command, self.path, body)
        decision = "HIT" if key in proxy.cache else "MISS"
        if decision == "MISS":
            request = urllib.request.Request(self.path, data=body or None, method=self.command)
            for name in ("Content-Type", "Cache-Control"):
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                with opener.open(request, timeout=10) as answer:
                    status, headers, content = answer.status, list(answer.headers.items()), answer.read()
            except urllib.error.HTTPError as error:
                status, headers, content = error.code, list(error.headers.items()), error.read()
            except OSError:
                message = {
                    "error": {"code": "upstream_unreachable", "message": "the origin refused the connection"}
                }
                status, headers, content = (
                    502,
                    [("Content-Type", "application/json")],
                    json.dumps(message).encode(),
                )
                decision = "BYPASS"
            if status == 200:
                proxy.cache[key] = (status, headers, content)
        else:
            status, headers, content = proxy.cache[key]
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("X-Cache", decision)
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_HEAD = _handle

    def do_CONNECT(self) -> None:  # this proxy opens no tunnels: HTTPS through it is refused
        self.server.fake.seen.append(f"CONNECT {self.path}")
        self.send_response(403, "Forbidden")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: Any


@contextmanager
def serving(fake: Any, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1") -> Iterator[Any]:
    server = _Server((host, 0), handler)
    server.fake = fake
    fake.url = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def fake_api(fake: FakeModelApi | None = None) -> Any:
    return serving(fake or FakeModelApi(), _ApiHandler)


def fake_proxy(fake: FakeProxy | None = None) -> Any:
    return serving(fake or FakeProxy(), _ProxyHandler)
