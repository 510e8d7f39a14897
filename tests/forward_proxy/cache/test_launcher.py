"""`forward-proxy run` and `mitmdump -s forward_proxy/addons.py`: start, announce, forward, stop cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from forward_proxy.errors import error_body, error_response
from tests.support.processes import REPO, ManagedProcess, console_script, free_port, wait_for_port
from tests.support.proxy import start_proxy
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration


@pytest.fixture
def upstream() -> Upstream:
    with Upstream() as server:
        yield server


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_announces_forwards_and_stops_cleanly(tmp_path: Path, upstream: Upstream, sig: int) -> None:
    proxy = start_proxy(tmp_path, "--cache-size", "2GiB", "--cache-ttl", "30m")
    try:
        line = next(line for line in proxy.log().splitlines() if "listening on" in line)
        assert line == f"forward-proxy listening on {proxy.url} (cache: {proxy.cache_dir}, 2.0 GiB, ttl 30m)"
        answer = requests.get(upstream.url("/anything"), proxies=proxy.proxies, timeout=30)
        assert answer.status_code == 200
        assert answer.json()["path"] == "/anything"
        assert upstream.calls("/anything") == 1
    finally:
        code = proxy.stop(sig)
    assert code == 0, proxy.log()
    assert "forward-proxy stopped" in proxy.log()


def test_run_rejects_a_bad_option_value_with_a_useful_message() -> None:
    result = subprocess.run(
        [console_script("forward-proxy"), "run", "--set", "cache_ttl=soon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cache_ttl: 'soon' is not a duration" in result.stderr


def test_run_rejects_an_unknown_option() -> None:
    result = subprocess.run(
        [console_script("forward-proxy"), "run", "--set", "cache_colour=blue"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cache_colour" in result.stderr


def test_options_lists_every_cache_option_with_help() -> None:
    from forward_proxy.cache.config import OPTIONS

    result = subprocess.run(
        [console_script("forward-proxy"), "run", "--options"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for option in OPTIONS:
        assert f"\n{option.name}:" in result.stdout
    assert "\nintercept_hosts:" in result.stdout


def mitmdump_with_the_addons(tmp_path: Path, *options: str) -> tuple[ManagedProcess, int]:
    """`mitmdump -s forward_proxy/addons.py --set OPTION ...` on a free loopback port, not yet waited for."""
    port = free_port()
    argv = [
        console_script("mitmdump"),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "-s",
        str(REPO / "forward_proxy" / "addons.py"),
        *(part for option in options for part in ("--set", option)),
    ]
    return ManagedProcess(argv, tmp_path / "mitmdump.log").start(), port


def test_mitmdump_loads_the_same_addons_and_options(tmp_path: Path, upstream: Upstream) -> None:
    process, port = mitmdump_with_the_addons(
        tmp_path, f"cache_dir={tmp_path / 'cache'}", "cache_ttl=30m", "cache_rules=POST /v1/embeddings"
    )
    try:
        assert process.proc is not None
        wait_for_port("127.0.0.1", port, timeout=60, proc=process.proc)
        proxies = {"http": f"http://127.0.0.1:{port}"}
        answer = requests.get(upstream.url("/through-mitmdump"), proxies=proxies, timeout=30)
        assert answer.status_code == 200
        assert upstream.calls("/through-mitmdump") == 1
    finally:
        code = process.stop()
    assert code == 0, process.log()
    assert "Loading script" in process.log()
    assert "OptionsError" not in process.log() and "Unknown option" not in process.log()


def test_mitmdump_with_the_addons_caches(tmp_path: Path, upstream: Upstream) -> None:
    process, port = mitmdump_with_the_addons(tmp_path, f"cache_dir={tmp_path / 'cache'}")
    try:
        assert process.proc is not None
        wait_for_port("127.0.0.1", port, timeout=60, proc=process.proc)
        proxies = {"http": f"http://127.0.0.1:{port}"}
        body = {"input": "cached by mitmdump", "model": "minilm"}
        answers = [
            requests.post(upstream.url("/v1/embeddings"), json=body, proxies=proxies, timeout=30)
            for _ in range(2)
        ]
        assert [answer.status_code for answer in answers] == [200, 200]
        assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "HIT"]
        assert answers[1].content == answers[0].content
        assert upstream.calls("/v1/embeddings") == 1
    finally:
        code = process.stop()
    assert code == 0, process.log()
    assert (tmp_path / "cache" / "entries").is_dir()  # the store is the one named by --set cache_dir


def test_error_body_has_the_one_error_shape() -> None:
    assert json.loads(error_body("upstream_timeout", "It took too long.", upstream="http://h:1")) == {
        "error": {"code": "upstream_timeout", "message": "It took too long.", "upstream": "http://h:1"}
    }
    response = error_response(504, "upstream_timeout", "It took too long.")
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.raw_content or b"")
    assert json.loads(response.raw_content or b"")["error"]["code"] == "upstream_timeout"
