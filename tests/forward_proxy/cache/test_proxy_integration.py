"""The cache through a real `forward-proxy run` process, with clients using it as HTTP_PROXY, in front of
a small upstream that counts its calls; once on diskcache and once on a real Redis (`conftest.py`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.forward_proxy.cache.conftest import CacheBackend
from tests.support.privileges import without_root_privileges
from tests.support.processes import console_script, free_port
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Reply, Upstream, self_signed_certificate

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cache_backend")]


@pytest.fixture(scope="module")
def upstream(cache_backend: CacheBackend) -> Iterator[Upstream]:
    with Upstream(model_version="v1") as server:  # one per backend: call counts start at 0
        yield server


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, cache_backend: CacheBackend) -> Iterator[RunningProxy]:
    directory = tmp_path_factory.mktemp("proxy")
    with start_proxy(directory, *cache_backend.args(directory)) as running:
        assert ("(cache: redis://" in running.log()) == (cache_backend.name == "redis")
        yield running


def post(
    proxy: RunningProxy, url: str, body: Any, headers: dict[str, str] | None = None
) -> requests.Response:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(url, data=data, headers=all_headers, proxies=proxy.proxies, timeout=60)


def test_a_repeated_request_is_served_from_the_cache(
    proxy: RunningProxy, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The way a service uses the proxy: HTTP_PROXY in its environment.
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = upstream.url("/v1/embeddings")
    body = {"input": "the same sentence", "model": "minilm"}
    first = requests.post(url, json=body, timeout=60)
    second = requests.post(url, json=body, timeout=60)
    assert first.status_code == second.status_code == 200
    assert first.headers["X-Cache"] == "MISS" and second.headers["X-Cache"] == "HIT"
    assert second.content == first.content
    assert second.headers["X-Cache-Key"] == first.headers["X-Cache-Key"]
    assert int(second.headers["Age"]) >= 0 and "Age" not in first.headers
    assert upstream.calls("/v1/embeddings") == 1


def test_json_key_order_and_spacing_share_an_entry(proxy: RunningProxy, upstream: Upstream) -> None:
    url = upstream.url("/v2/models/digits/infer")
    before = upstream.calls("/v2/models/digits/infer")
    first = post(proxy, url, '{"inputs": [{"name": "x", "data": [1, 2]}], "id": "a"}')
    second = post(proxy, url, '{ "id":"a",\n  "inputs":[ {"data":[1,2],"name":"x"} ] }')
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.content == first.content
    assert upstream.calls("/v2/models/digits/infer") == before + 1


def test_other_values_credentials_and_namespaces_do_not_share(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    url = upstream.url("/v1/embeddings")
    body = {"input": "partitioned"}
    variants = [
        ({}, body),
        ({}, {"input": "partitioned!"}),
        ({"Authorization": "Bearer tenant-a"}, body),
        ({"Authorization": "Bearer tenant-b"}, body),
        ({"X-Cache-Namespace": "experiment"}, body),
    ]
    answers = [post(proxy, url, variant_body, headers) for headers, variant_body in variants]
    assert [answer.headers["X-Cache"] for answer in answers] == ["MISS"] * len(variants)
    assert len({answer.headers["X-Cache-Key"] for answer in answers}) == len(variants)
    again = post(proxy, url, body, {"Authorization": "Bearer tenant-a"})
    assert again.headers["X-Cache"] == "HIT" and again.content == answers[2].content


def test_requests_no_rule_matches_pass_untouched(proxy: RunningProxy, upstream: Upstream) -> None:
    url = upstream.url("/v1/models")
    answers = [requests.get(url, proxies=proxy.proxies, timeout=60) for _ in range(2)]
    assert [answer.json()["call"] for answer in answers] == [1, 2]
    assert all("X-Cache" not in answer.headers for answer in answers)


def test_age_grows(proxy: RunningProxy, upstream: Upstream) -> None:
    url = upstream.url("/v1/embeddings")
    post(proxy, url, {"input": "ageing"})
    ages = [int(post(proxy, url, {"input": "ageing"}).headers["Age"])]
    deadline = time.monotonic() + 10
    while ages[-1] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        ages.append(int(post(proxy, url, {"input": "ageing"}).headers["Age"]))
    assert ages[0] == 0 and ages[-1] >= 1


def test_cache_control_directives(proxy: RunningProxy, upstream: Upstream) -> None:
    url = upstream.url("/v1/embeddings")
    body = {"input": "directives"}
    calls = upstream.calls("/v1/embeddings")
    only_cached_miss = post(proxy, url, body, {"Cache-Control": "only-if-cached"})
    assert only_cached_miss.status_code == 504
    assert only_cached_miss.json()["error"]["code"] == "not_cached"
    assert upstream.calls("/v1/embeddings") == calls

    stored = post(proxy, url, body)
    assert stored.headers["X-Cache"] == "MISS"
    assert post(proxy, url, body, {"Cache-Control": "only-if-cached"}).headers["X-Cache"] == "HIT"
    assert post(proxy, url, body, {"Cache-Control": "max-age=60"}).headers["X-Cache"] == "HIT"

    bypass = post(proxy, url, body, {"Cache-Control": "no-store"})
    assert bypass.headers["X-Cache"] == "BYPASS" and bypass.content != stored.content

    refreshed = post(proxy, url, body, {"Cache-Control": "no-cache"})
    assert refreshed.headers["X-Cache"] == "REFRESH" and refreshed.content != stored.content
    after_refresh = post(proxy, url, body)
    assert after_refresh.headers["X-Cache"] == "HIT" and after_refresh.content == refreshed.content

    pragma = post(proxy, url, body, {"Pragma": "no-cache"})
    assert pragma.headers["X-Cache"] == "REFRESH"

    time.sleep(1.1)
    too_old = post(proxy, url, body, {"Cache-Control": "max-age=0"})
    assert too_old.headers["X-Cache"] == "MISS"
    assert upstream.calls("/v1/embeddings") == calls + 5


def test_32_concurrent_identical_requests_make_one_upstream_call(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    upstream.reply("/v2/models/slow/infer", Reply(delay=1.0))
    url = upstream.url("/v2/models/slow/infer")
    start = threading.Barrier(32)

    def call(_: int) -> requests.Response:
        start.wait(timeout=30)
        return post(proxy, url, {"inputs": [{"name": "x", "data": [42]}]})

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(call, range(32)))
    assert upstream.calls("/v2/models/slow/infer") == 1
    assert all(answer.status_code == 200 for answer in answers)
    assert len({answer.content for answer in answers}) == 1
    decisions = sorted(answer.headers["X-Cache"] for answer in answers)
    assert decisions.count("MISS") == 1
    assert set(decisions) <= {"MISS", "COALESCED", "HIT"}


def test_upstream_errors_are_passed_on_and_not_cached(proxy: RunningProxy, upstream: Upstream) -> None:
    upstream.reply("/v2/models/broken/infer", Reply(status=500, body=b'{"error": "boom"}'))
    url = upstream.url("/v2/models/broken/infer")
    answers = [post(proxy, url, {"inputs": []}) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [500, 500]
    assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "MISS"]
    assert upstream.calls("/v2/models/broken/infer") == 2


def test_an_unreachable_upstream_gives_a_json_502(proxy: RunningProxy) -> None:
    port = free_port()
    answer = post(proxy, f"http://127.0.0.1:{port}/v1/embeddings", {"input": "nobody there"})
    assert answer.status_code == 502
    assert answer.headers["Content-Type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == "upstream_unreachable"
    assert error["upstream"] == f"http://127.0.0.1:{port}"
    assert f"127.0.0.1:{port}" in error["message"]


def test_a_slow_upstream_gives_a_json_504(tmp_path: Path, cache_backend: CacheBackend) -> None:
    with (
        Upstream() as slow,
        start_proxy(tmp_path, "--set", "upstream_timeout=500ms", *cache_backend.args(tmp_path)) as proxy,
    ):
        slow.reply("/v1/embeddings", Reply(delay=3.0))
        started = time.monotonic()
        answer = post(proxy, slow.url("/v1/embeddings"), {"input": "slow"})
        assert time.monotonic() - started < 2.5
        assert answer.status_code == 504
        assert answer.json()["error"]["code"] == "upstream_timeout"


@pytest.mark.slow
def test_a_new_model_version_is_never_answered_with_old_entries(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    interval = 1.0
    with (
        Upstream(model_version="v1") as model,
        start_proxy(
            tmp_path, "--set", f"version_check_interval={interval}", *cache_backend.args(tmp_path)
        ) as proxy,
    ):
        url = model.url("/v1/embeddings")
        body = {"input": "versioned"}
        assert post(proxy, url, body).headers["X-Model-Version"] == "v1"
        assert post(proxy, url, body).headers["X-Cache"] == "HIT"
        model.restart(model_version="v2")
        checks_before = model.calls("/v2/health/live")
        changed_at = time.monotonic()
        seen = []
        while time.monotonic() - changed_at < interval * 3:
            answer = post(proxy, url, body)
            seen.append(
                (time.monotonic() - changed_at, answer.headers["X-Model-Version"], answer.headers["X-Cache"])
            )
            time.sleep(0.05)
        old = [when for when, version, _ in seen if version == "v1"]
        assert not old or max(old) <= interval + 0.5, seen
        assert seen[-1][1:] == ("v2", "HIT")
        assert model.calls("/v1/embeddings") == 2  # one per version
        # Hits re-check the version once what the proxy knows is half an interval old, one check at a
        # time: a steady stream of hits must not turn into a stream of checks.
        duration = time.monotonic() - changed_at
        checks = model.calls("/v2/health/live") - checks_before
        assert 1 <= checks <= duration / (interval / 2) + 2, (checks, duration, len(seen))


UPSTREAM_FAILURES = ("down", "503 JSON", "timeout")


@pytest.mark.slow
@pytest.mark.parametrize("failure", UPSTREAM_FAILURES)
def test_stale_if_error_serves_the_expired_entry_while_the_upstream_fails(
    tmp_path: Path, cache_backend: CacheBackend, failure: str
) -> None:
    model = Upstream().start()
    args = ("--cache-ttl", "1s", "--set", "stale_if_error=5m", "--set", "upstream_timeout=500ms")
    try:
        with start_proxy(tmp_path, *args, *cache_backend.args(tmp_path)) as proxy:
            url = model.url("/v1/embeddings")
            fresh = post(proxy, url, {"input": "stale"})
            assert fresh.headers["X-Cache"] == "MISS"
            if failure == "down":
                model.stop()
            elif failure == "503 JSON":
                overloaded = b'{"error": {"code": "overloaded", "message": "retry later"}}'
                model.reply("/v1/embeddings", Reply(status=503, body=overloaded))
            else:
                model.reply("/v1/embeddings", Reply(delay=2.0))
            time.sleep(1.2)
            calls = model.calls("/v1/embeddings")
            stale = post(proxy, url, {"input": "stale"})
            assert stale.status_code == 200
            assert stale.headers["X-Cache"] == "STALE"
            assert stale.content == fresh.content
            assert int(stale.headers["Age"]) >= 1
            if failure != "down":
                assert model.calls("/v1/embeddings") == calls + 1  # the upstream was asked, and failed
            other = post(proxy, url, {"input": "never cached"})
            expected = {"down": 502, "503 JSON": 503, "timeout": 504}[failure]
            assert other.status_code == expected
            assert other.headers["X-Cache"] == "MISS"
    finally:
        model.stop()


def stats_report(cache_dir: Path) -> dict[str, Any]:
    result = subprocess.run(
        [console_script("forward-proxy"), "stats", "--json", "--cache-dir", str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.mark.disk_only
def test_entries_beyond_the_cache_size_are_evicted_and_counted(tmp_path: Path) -> None:
    limit = 1024 * 1024
    with Upstream() as model, start_proxy(tmp_path, "--cache-size", "1MiB") as proxy:
        model.reply("/v1/embeddings", Reply(body=b'{"outputs": "' + b"x" * 150_000 + b'"}'))
        url = model.url("/v1/embeddings")
        answers = [post(proxy, url, {"input": f"evicted {index}"}) for index in range(12)]  # ~1.8 MB
        assert [answer.headers["X-Cache"] for answer in answers] == ["MISS"] * 12
        # Eviction runs in the proxy's once-a-second flush; the counters follow within a second.
        deadline = time.monotonic() + 20
        report = stats_report(proxy.cache_dir)
        while report["evictions"] == 0 or report["size_bytes"] > limit:
            assert time.monotonic() < deadline, report
            time.sleep(0.3)
            report = stats_report(proxy.cache_dir)
        assert report["limit_bytes"] == limit
        assert report["stores"] == 12
        assert 0 < report["entries"] < 12
        assert report["entries"] + report["evictions"] == 12
        # The least recently used went first: the last answer stored is still there, the first is not.
        assert post(proxy, url, {"input": "evicted 11"}).headers["X-Cache"] == "HIT"
        assert post(proxy, url, {"input": "evicted 0"}).headers["X-Cache"] == "MISS"
        assert model.calls("/v1/embeddings") == 13


@pytest.mark.disk_only
def test_an_unusable_cache_directory_keeps_requests_working(tmp_path: Path, upstream: Upstream) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("the cache directory cannot be created below a file")
    # The privacy addon keeps its pseudonym key beside the cache by default; give it a usable place.
    key_file = f"pseudonym_key_file={tmp_path / 'pseudonym.key'}"
    with start_proxy(tmp_path, "--set", key_file, cache_dir=blocker / "cache") as proxy:
        url = upstream.url("/v1/embeddings")
        answers = [post(proxy, url, {"input": "uncached"}) for _ in range(2)]
        assert [answer.status_code for answer in answers] == [200, 200]
        assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "MISS"]
        assert "cache store unavailable, requests are forwarded uncached" in proxy.log()


@pytest.mark.disk_only
def test_a_read_only_cache_directory_keeps_requests_working(tmp_path: Path, upstream: Upstream) -> None:
    cache_dir = tmp_path / "read-only"
    cache_dir.mkdir()
    cache_dir.chmod(0o555)
    try:
        key_file = f"pseudonym_key_file={tmp_path / 'pseudonym.key'}"
        wrapper = without_root_privileges()  # as root, the proxy too must obey the read-only mode
        with start_proxy(tmp_path, "--set", key_file, cache_dir=cache_dir, wrapper=wrapper) as proxy:
            url = upstream.url("/v1/embeddings")
            answers = [post(proxy, url, {"input": "read-only"}) for _ in range(2)]
            assert [answer.status_code for answer in answers] == [200, 200]
            assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "MISS"]
    finally:
        cache_dir.chmod(0o755)


@pytest.mark.disk_only
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_a_full_disk_keeps_requests_working(tmp_path: Path, upstream: Upstream) -> None:
    upstream.reply("/v2/models/large/infer", Reply(body=b'{"outputs": "' + b"x" * 400_000 + b'"}'))
    # Files may not grow beyond 256 KiB: every answer of 400 kB fails to be written, as on a full disk.
    with start_proxy(tmp_path, wrapper=("prlimit", f"--fsize={256 * 1024}")) as proxy:
        url = upstream.url("/v2/models/large/infer")
        answers = [post(proxy, url, {"inputs": []})]
        # Until its write has failed, the answer is shared with identical requests (a HIT): wait for that.
        deadline = time.monotonic() + 10
        while "cache store failed, forwarding uncached" not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        answers.append(post(proxy, url, {"inputs": []}))
        assert [answer.status_code for answer in answers] == [200, 200]
        assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "MISS"]
        assert all(len(answer.content) > 400_000 for answer in answers)
        assert "cache store failed, forwarding uncached" in proxy.log()


@pytest.mark.disk_only
def test_a_cache_database_broken_while_running_keeps_requests_working(
    tmp_path: Path, upstream: Upstream
) -> None:
    with start_proxy(tmp_path) as proxy:
        url = upstream.url("/v1/embeddings")
        assert post(proxy, url, {"input": "before"}).headers["X-Cache"] == "MISS"
        database = proxy.cache_dir / "entries" / "cache.db"
        with database.open("r+b") as file:  # what a failing disk leaves behind
            file.write(b"\0" * 4096 * 4)
        answers = [post(proxy, url, {"input": f"after {index}"}) for index in range(3)]
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        assert "cache store failed, forwarding uncached" in proxy.log()


def test_connect_tunnels_pass_through_without_interception(tmp_path: Path, proxy: RunningProxy) -> None:
    certificate = self_signed_certificate(tmp_path, ["localhost", "127.0.0.1"])
    with Upstream(certificate=certificate) as tls_upstream:
        url = f"https://localhost:{tls_upstream.port}/v1/embeddings"
        answers = [
            requests.post(
                url, json={"input": "tls"}, proxies=proxy.proxies, verify=str(certificate), timeout=60
            )
            for _ in range(2)
        ]
        # The client verified the upstream's own certificate: nothing in between decrypted the tunnel.
        assert [answer.json()["call"] for answer in answers] == [1, 2]
        assert all("X-Cache" not in answer.headers for answer in answers)


@pytest.mark.slow
def test_intercepted_hosts_are_cached_over_https(tmp_path: Path, cache_backend: CacheBackend) -> None:
    certificate = self_signed_certificate(tmp_path, ["localhost", "127.0.0.1"])
    confdir = tmp_path / "mitmproxy-conf"
    with (
        Upstream(certificate=certificate) as tls_upstream,
        start_proxy(
            tmp_path,
            "--set",
            "intercept_hosts=localhost",
            "--set",
            f"confdir={confdir}",
            "--set",
            "ssl_insecure=true",  # the test upstream's certificate is self-signed
            *cache_backend.args(tmp_path),
        ) as proxy,
    ):
        url = f"https://localhost:{tls_upstream.port}/v1/embeddings"
        ca = confdir / "mitmproxy-ca-cert.pem"
        answers = [
            requests.post(url, json={"input": "tls"}, proxies=proxy.proxies, verify=str(ca), timeout=60)
            for _ in range(2)
        ]
        assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "HIT"]
        assert tls_upstream.calls("/v1/embeddings") == 1
