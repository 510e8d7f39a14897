"""The admin listener addon: option checks in mitmproxy's test context, serving inside `forward-proxy run`."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from forward_proxy.stats.admin import AdminListener
from tests.support.processes import console_script, free_port, wait_for_http
from tests.support.proxy import start_proxy

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
def test_a_taken_admin_port_leaves_the_proxy_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with start_proxy(tmp_path, "--admin-port", str(port)) as proxy:
            deadline = time.monotonic() + 30
            while "admin listener: cannot serve" not in proxy.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert f"cannot serve on 127.0.0.1:{port}" in proxy.log()
            assert "Choose another admin_port (--admin-port)" in proxy.log()
            assert proxy.process.proc is not None and proxy.process.proc.poll() is None


def test_a_bad_admin_port_stops_forward_proxy_run_with_a_message() -> None:
    result = subprocess.run(
        [console_script("forward-proxy"), "run", "--admin-port", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "admin_port: -1 is not a port" in result.stderr
