"""Hardening (issue 12) outside the cache core, against a real `forward-proxy run` on loopback: bounded
statistics under invented labels, CONNECT failures in the JSON error shape, and start-up that never
announces a port it does not serve."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import requests

from forward_proxy.cache.credentials import CREDENTIAL_HEADERS, DEFAULT_PARTITION_HEADERS
from tests.support.processes import console_script, free_port
from tests.support.proxy import READY_LINE, RunningProxy, start_proxy
from tests.support.upstream import Upstream

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _admin_get(port: int, path: str) -> bytes:
    with _NO_PROXY.open(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return bytes(response.read())


def _embed(session: requests.Session, url: str, model: str, text: str) -> int:
    return session.post(url, json={"model": model, "input": [text]}, timeout=30).status_code


def _settled_metrics(admin_port: int, requests_expected: int) -> bytes:
    """/metrics once the proxy's buffered counters reached the store (they flush every 0.25 s)."""
    deadline = time.monotonic() + 30
    while True:
        report = json.loads(_admin_get(admin_port, "/stats"))
        if report["requests"] >= requests_expected or time.monotonic() > deadline:
            return _admin_get(admin_port, "/metrics")
        time.sleep(0.2)


def _models(metrics: bytes) -> set[str]:
    return {model.decode() for model in re.findall(rb'model="([^"]*)"', metrics)}


@pytest.mark.slow
def test_invented_model_names_and_dead_origins_keep_the_statistics_small(tmp_path: Path) -> None:
    admin_port = free_port()
    cache_dir = tmp_path / "cache"
    closed = f"http://127.0.0.1:{free_port()}/v1/embeddings"  # nobody listens there
    with Upstream() as upstream:
        url = upstream.url("/v1/embeddings")
        with start_proxy(tmp_path, "--admin-port", str(admin_port), cache_dir=cache_dir) as proxy:
            session = proxy.session()
            for serial in range(3000):
                assert _embed(session, url, f"model-{serial}", "same text") == 200
            long_name = "m" * 10_000
            for serial in range(500):
                assert _embed(session, url, f"{long_name}-{serial}", "same text") == 200
            for serial in range(20):
                assert _embed(session, closed, f"dead-{serial}", "x") >= 500
            metrics = _settled_metrics(admin_port, 3500)
            report = json.loads(_admin_get(admin_port, "/stats"))
        print(f"/metrics after 3,500 invented model names: {len(metrics)} bytes")
        assert len(metrics) < 100_000, len(metrics)  # 92 MB per scrape before the bounds
        models = _models(metrics)
        assert len(models) <= 20 + 1 and "other" in models, sorted(models)[:30]
        assert max(len(m) for m in models) <= 100
        assert report["requests"] >= 3500  # every request is still counted, some under "other"
        assert closed.rsplit("/v1", 1)[0] not in json.dumps(report)  # no upstream ever answered there

        # Across a restart, the store's labels count towards the bounds: new names are "other" too.
        with start_proxy(tmp_path, "--admin-port", str(admin_port), cache_dir=cache_dir) as proxy:
            session = proxy.session()
            for serial in range(50):
                assert _embed(session, url, f"after-restart-{serial}", "same text") == 200
            metrics = _settled_metrics(admin_port, 3550)
        assert not any(m.startswith("after-restart") for m in _models(metrics))
        assert len(metrics) < 100_000


def _connect(proxy: RunningProxy, target: str) -> tuple[str, dict[str, str], bytes]:
    """A raw CONNECT to `target`; the status line, the headers and the body of the proxy's answer."""
    with socket.create_connection((proxy.host, proxy.port), timeout=30) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", "0")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return lines[0], headers, body


def test_connect_failures_are_answered_in_the_json_error_shape(tmp_path: Path) -> None:
    unreachable = f"127.0.0.1:{free_port()}"  # nobody listens there
    with start_proxy(tmp_path) as proxy:
        for target, code in (
            (unreachable, "upstream_unreachable"),
            (f"127.0.0.1:{proxy.port}", "proxy_loop"),
        ):
            status, headers, body = _connect(proxy, target)
            assert status.startswith("HTTP/1.1 502"), (target, status, body)
            assert headers["content-type"] == "application/json", (target, body)
            error = json.loads(body)["error"]
            assert error["code"] == code and target in error["message"], error
            assert "connection_strategy" not in error["message"]
        assert proxy.process.proc is not None and proxy.process.proc.poll() is None


def test_a_taken_listen_port_stops_forward_proxy_run_before_it_says_it_listens(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                console_script("forward-proxy"),
                "run",
                "--listen-port",
                str(port),
                "--cache-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert READY_LINE not in output
    assert f"127.0.0.1:{port}" in output and "--listen-port" in output, output


def test_origins_are_counted_once_an_upstream_answered_there(tmp_path: Path) -> None:
    admin_port = free_port()
    closed = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with Upstream() as upstream, start_proxy(tmp_path, "--admin-port", str(admin_port)) as proxy:
        session = proxy.session()
        for _ in range(3):  # BYPASS: mitmproxy forwards these itself
            answer = session.post(
                upstream.url("/v1/embeddings"),
                json={"model": "m", "input": ["a"]},
                headers={"Cache-Control": "no-store"},
                timeout=30,
            )
            assert answer.headers["X-Cache"] == "BYPASS"
            assert (
                session.post(closed + "/v1/embeddings", json={"input": ["a"]}, timeout=30).status_code >= 500
            )
            assert (
                session.post(
                    closed + "/v1/embeddings",
                    json={"input": ["b"]},
                    headers={"Cache-Control": "no-store"},
                    timeout=30,
                ).status_code
                >= 500
            )
        deadline = time.monotonic() + 30
        while True:
            origins = {row["origin"]: row for row in json.loads(_admin_get(admin_port, "/stats"))["origins"]}
            if upstream.origin in origins or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert origins[upstream.origin]["requests"] == 3 and origins[upstream.origin]["bypasses"] == 3
    assert closed not in origins  # refused every time: never counted, never stored


def test_the_default_partition_covers_the_credential_headers_of_the_common_model_apis() -> None:
    named_by_the_issue = {
        "authorization",  # OpenAI, Cohere, Hugging Face, ...
        "x-api-key",  # Anthropic
        "api-key",  # Azure OpenAI
        "x-goog-api-key",  # Google
        "openai-organization",
        "openai-project",
        "cookie",
    }
    assert named_by_the_issue <= set(DEFAULT_PARTITION_HEADERS)
    assert all(reason.strip() for reason in CREDENTIAL_HEADERS.values())
    documented = (Path(__file__).parents[2] / "docs" / "privacy.md").read_text().lower()
    assert all(f"| `{name}` |" in documented for name in DEFAULT_PARTITION_HEADERS)
