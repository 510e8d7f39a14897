"""The admin listener addon: option checks in mitmproxy's test context, serving inside `forward-proxy run`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from forward_proxy.stats.admin import AdminListener
from tests.support.processes import console_script, free_port, wait_for_http
from tests.support.proxy import RunningProxy, start_proxy

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> bytes:
    with _NO_PROXY.open(url, timeout=10) as response:
        return bytes(response.read())


def test_the_listener_is_off_by_default() -> None:
    addon = AdminListener()
    with taddons.context(addon) as tctx:
        assert tctx.options.admin_port == 0 and tctx.options.admin_host == "127.0.0.1"
        addon.running()
        assert addon.server is None
        addon.done()


def test_a_port_out_of_range_is_refused() -> None:
    addon = AdminListener()
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError, match="admin_port: 70000"):
        tctx.configure(addon, admin_port=70000)


@pytest.mark.integration
def test_forward_proxy_run_serves_stats_metrics_and_the_dashboard(tmp_path: Path) -> None:
    admin_port = free_port()
    with start_proxy(tmp_path, "--admin-port", str(admin_port)) as proxy:
        base = f"http://127.0.0.1:{admin_port}/"
        wait_for_http(base + "stats", timeout=30)
        report = json.loads(_get(base + "stats"))
        assert report["schema_version"] == 1 and report["requests"] == 0 and report["entries"] == 0
        assert report["limit_bytes"] == 1 << 30  # the proxy's default --cache-size
        assert b"forward_proxy_cache_hit_ratio 0.0" in _get(base + "metrics")
        assert b"<title>forward-proxy" in _get(base)
        assert proxy.process.proc is not None and proxy.process.proc.poll() is None


@pytest.mark.integration
def test_a_taken_admin_port_stops_forward_proxy_run_before_it_says_it_listens(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                console_script("forward-proxy"),
                "run",
                "--listen-port",
                str(free_port()),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--admin-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "listening on" not in output  # a supervisor waiting for that line never sees it
    assert f"cannot serve on 127.0.0.1:{port}" in output and "--admin-port" in output


def test_a_bad_admin_port_stops_forward_proxy_run_with_a_message() -> None:
    result = subprocess.run(
        [console_script("forward-proxy"), "run", "--admin-port", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "admin_port: -1 is not a port" in result.stderr


def _admin(tmp_path: Path, *args: str) -> tuple[RunningProxy, str, int]:
    admin_port = free_port()
    proxy = start_proxy(tmp_path, "--admin-port", str(admin_port), *args)  # the listener serves before
    return proxy, f"http://127.0.0.1:{admin_port}/", admin_port  # the proxy prints that it listens


def _raw(port: int, request: bytes, source: str = "127.0.0.1", timeout: float = 10) -> bytes:
    """Send `request` from `source` and read until the listener closes or answers once."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        try:
            sock.sendall(request)
            return sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return b""


@pytest.mark.integration
def test_the_admin_listener_refuses_clients_the_proxy_refuses(tmp_path: Path) -> None:
    proxy, _, port = _admin(tmp_path, "--allow-clients", "127.0.0.1/32")
    with proxy:
        request = b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        assert _raw(port, request, source="127.0.0.2") == b""  # closed before any answer
        assert _raw(port, request).startswith(b"HTTP/1.1 200")


@pytest.mark.integration
def test_admin_allow_clients_is_its_own_list(tmp_path: Path) -> None:
    proxy, _, port = _admin(tmp_path, "--set", "admin_allow_clients=127.0.0.2/32")
    with proxy:
        request = b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        assert _raw(port, request, source="127.0.0.2").startswith(b"HTTP/1.1 200")
        assert _raw(port, request, source="127.0.0.1") == b""


@pytest.mark.integration
def test_a_foreign_host_is_refused_and_an_added_one_served(tmp_path: Path) -> None:
    proxy, _, port = _admin(tmp_path, "--set", "admin_allow_hosts=stats.internal")
    with proxy:
        for host in (b"rebind.attacker.example", b"rebind.attacker.example:%d" % port):
            answer = _raw(port, b"GET /stats HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 403"), answer
            assert b'"host_not_allowed"' in answer and b"admin_allow_hosts" in answer
        assert _raw(port, b"GET /stats HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 403")  # no Host at all
        for host in (b"localhost:%d" % port, b"[::1]", b"stats.internal:%d" % port):
            answer = _raw(port, b"GET /stats HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200"), (host, answer)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_idle_admin_connections_hold_no_threads_and_are_closed_after_the_timeout(tmp_path: Path) -> None:
    proxy, base, port = _admin(tmp_path, "--set", "admin_idle_timeout=2")
    with proxy:
        before = _threads(proxy.process.pid)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(300)]
        try:
            time.sleep(0.5)
            during = _threads(proxy.process.pid)
            assert during <= before + 4, (before, during)  # no thread per connection
            started = time.monotonic()
            for sock in idle:  # every one is closed: the surplus at once, the admitted after the timeout
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(1) == b""
            assert time.monotonic() - started < 10
        finally:
            for sock in idle:
                sock.close()
        assert json.loads(_get(base + "stats"))["schema_version"] == 1  # still serving


@pytest.mark.integration
def test_a_reset_admin_connection_prints_nothing_that_names_the_client(tmp_path: Path) -> None:
    proxy, base, port = _admin(tmp_path)
    with proxy:
        for request in (
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 50,
            b"GET /sta",
            b"NOT HTTP AT ALL\r\n\r\n",
        ):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.3", 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(request)
            sock.close()  # RST
        time.sleep(1)
        assert json.loads(_get(base + "stats"))["schema_version"] == 1
        log = proxy.log()
    assert "127.0.0.3" not in log and "Traceback" not in log, log
