"""The admin HTTP server on an ephemeral loopback port, serving a fixed report."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from forward_proxy.stats.server import DASHBOARD_DIR, AdminServer, History
from tests.forward_proxy.stats.sample_report import sample_report, sample_report_with_chat

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with _NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[], Mapping[str, Any]]], AdminServer]]:
    started: list[AdminServer] = []

    def start(read: Callable[[], Mapping[str, Any]]) -> AdminServer:
        server = AdminServer(read, host="127.0.0.1", port=0, history_interval=0.05, history_capacity=4)
        started.append(server.start())
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def test_stats_is_the_report_as_json(serve: Callable[..., AdminServer]) -> None:
    server = serve(sample_report)
    status, content_type, body = _get(server.url + "stats")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == sample_report()


def test_metrics_is_prometheus_text(serve: Callable[..., AdminServer]) -> None:
    server = serve(sample_report)
    status, content_type, body = _get(server.url + "metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    assert b'forward_proxy_cache_requests_total{decision="hit"' in body


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("", "text/html"),
        ("index.html", "text/html"),
        ("dashboard.js", "text/javascript"),
        ("dashboard.css", "text/css"),
    ],
)
def test_the_dashboard_files_are_served(
    serve: Callable[..., AdminServer], path: str, content_type: str
) -> None:
    server = serve(sample_report)
    status, served_type, body = _get(server.url + path)
    assert status == 200 and served_type.startswith(content_type)
    name = path or "index.html"
    assert body == (DASHBOARD_DIR / name).read_bytes()


def test_the_dashboard_loads_nothing_from_outside() -> None:
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", (DASHBOARD_DIR / name).read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)


def test_history_keeps_the_last_samples(serve: Callable[..., AdminServer]) -> None:
    clock = iter(range(1, 1000))

    def read() -> dict[str, Any]:
        return sample_report(generated_at=float(next(clock)))

    server = serve(read)
    deadline = time.monotonic() + 30
    while len(server.history.as_json()["samples"]) < 4 or server.history.as_json()["samples"][0]["time"] < 2:
        assert time.monotonic() < deadline, "the sampler did not fill the history"
        time.sleep(0.02)
    status, _, body = _get(server.url + "stats/history")
    history = json.loads(body)
    assert status == 200 and history["interval_seconds"] == 0.05
    times = [sample["time"] for sample in history["samples"]]
    assert len(times) == 4 and times == sorted(times)  # bounded, oldest first
    assert history["samples"][0]["requests"] == 10 and history["samples"][0]["hits"] == 5


def test_a_history_sample_keeps_the_tokens_and_time_saved() -> None:
    history = History(interval=2.0, capacity=2)
    history.add(sample_report_with_chat())
    [sample] = history.as_json()["samples"]
    assert (sample["completion_tokens_saved"], sample["upstream_seconds_saved"]) == (96, 5.25)


def test_an_unknown_path_is_a_json_404(serve: Callable[..., AdminServer]) -> None:
    server = serve(sample_report)
    status, content_type, body = _get(server.url + "nope")
    assert (status, content_type) == (404, "application/json")
    assert json.loads(body)["error"]["code"] == "not_found"


def test_a_failing_store_is_a_json_503_and_the_server_keeps_serving(
    serve: Callable[..., AdminServer],
) -> None:
    def broken() -> dict[str, Any]:
        raise OSError("disk I/O error")

    server = serve(broken)
    for path in ("stats", "metrics"):
        status, _, body = _get(server.url + path)
        assert status == 503
        error = json.loads(body)["error"]
        assert error["code"] == "stats_unavailable" and "disk I/O error" in error["message"]
    assert _get(server.url)[0] == 200


def test_head_answers_without_a_body(serve: Callable[..., AdminServer]) -> None:
    server = serve(sample_report)
    status, _, body = _get(server.url + "stats", method="HEAD")
    assert (status, body) == (200, b"")


def test_on_a_running_loop_it_serves_there_and_frees_its_port_at_once_when_stopped() -> None:
    """Inside the proxy the server runs on mitmproxy's loop; a restart (new options) binds the port again."""

    async def main() -> None:
        first = AdminServer(sample_report, port=0).start()
        port = first.address[1]
        status, _, body = await asyncio.to_thread(_get, first.url + "stats")
        assert status == 200 and json.loads(body) == sample_report()
        first.stop()
        second = AdminServer(sample_report, port=port).start()  # the same port, at once
        assert (await asyncio.to_thread(_get, second.url + "stats"))[0] == 200
        second.stop()

    asyncio.run(main())
