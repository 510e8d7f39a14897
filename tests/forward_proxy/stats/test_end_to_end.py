"""A known sequence of requests through real `forward-proxy run` processes, then every place that reports it.

The counting upstream (tests/support/upstream.py) says how often it was really called; the statistics
must agree with it and with each other: `forward-proxy stats --json`, the table, `/stats`, `/metrics`
(parsed with prometheus_client), the dashboard in headless Chromium, and the access log.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.forward_proxy.stats.browser import dump_dom, screenshot, texts_by_id
from tests.forward_proxy.stats.table import parse_table
from tests.support.processes import console_script, free_port, wait_for_http
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Reply, Upstream

pytestmark = pytest.mark.integration

EMBEDDINGS = "POST /v1/embeddings"
INFER = "POST /v2/models/*/infer"
UPSTREAM_DELAY = 0.1  # seconds each upstream answer takes: what every hit saves, at least
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        server.default(Reply(delay=UPSTREAM_DELAY))
        yield server


def _stats(cache_dir: Path, *args: str) -> str:
    result = subprocess.run(
        [console_script("forward-proxy"), "stats", "--cache-dir", str(cache_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _report_when(cache_dir: Path, requests_seen: int) -> dict[str, Any]:
    """`stats --json` once the proxies' counts reached the store (they are written every 0.25 s)."""
    deadline = time.monotonic() + 30
    while True:
        report: dict[str, Any] = json.loads(_stats(cache_dir, "--json"))
        if report["requests"] >= requests_seen or time.monotonic() > deadline:
            return report
        time.sleep(0.1)


def _get(url: str) -> bytes:
    with _NO_PROXY.open(url, timeout=10) as response:
        return bytes(response.read())


def _decisions(session: requests.Session, upstream: Upstream) -> list[str]:
    """The known sequence: 8 requests a rule matches (3 hits, 3 misses, 1 bypass, 1 refresh) and 1 other."""
    embed_a = {"model": "mini", "input": "a"}
    embed_b = {"model": "mini", "input": "b"}
    infer = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    calls: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/v1/embeddings", embed_a, {}),  # MISS
        ("/v1/embeddings", embed_a, {}),  # HIT
        ("/v1/embeddings", embed_a, {}),  # HIT
        ("/v1/embeddings", embed_b, {}),  # MISS
        ("/v1/embeddings", embed_b, {"Cache-Control": "no-store"}),  # BYPASS
        ("/v1/embeddings", embed_a, {"Cache-Control": "no-cache"}),  # REFRESH
        ("/v2/models/digits/infer", infer, {}),  # MISS
        ("/v2/models/digits/infer", infer, {}),  # HIT
    ]
    seen = []
    for path, body, headers in calls:
        answer = session.post(upstream.url(path), json=body, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        seen.append(answer.headers["X-Cache"])
    assert session.get(upstream.url("/health"), timeout=30).status_code == 200  # no rule: not counted
    return seen


KNOWN_DECISIONS = ["MISS", "HIT", "HIT", "MISS", "BYPASS", "REFRESH", "MISS", "HIT"]


@pytest.mark.slow
@pytest.mark.browser
def test_every_report_shows_exactly_the_known_sequence(tmp_path: Path, upstream: Upstream) -> None:
    admin_port = free_port()
    access_log = tmp_path / "access.jsonl"
    proxy = start_proxy(tmp_path, "--admin-port", str(admin_port), "--access-log", str(access_log))
    admin = f"http://127.0.0.1:{admin_port}/"
    try:
        wait_for_http(admin + "stats", timeout=30)
        assert _decisions(proxy.session(), upstream) == KNOWN_DECISIONS
        assert upstream.calls("/v1/embeddings") == 4 and upstream.calls("/v2/models/digits/infer") == 1

        report = _report_when(proxy.cache_dir, 8)
        _check_json(report)
        assert json.loads(_get(admin + "stats"))["requests"] == 8
        _check_metrics(_get(admin + "metrics").decode(), report)
        _check_table(_stats(proxy.cache_dir), report)
        _check_dashboard(admin, tmp_path, report)
    finally:
        proxy.stop()
    _check_access_log(access_log, report)


def _check_json(report: dict[str, Any]) -> None:
    assert (report["requests"], report["hits"], report["misses"]) == (8, 3, 3)
    assert (report["bypasses"], report["refreshes"], report["coalesced"], report["stale"]) == (1, 1, 0, 0)
    assert (report["stores"], report["store_errors"], report["upstream_errors"]) == (4, 0, 0)
    assert report["hit_ratio"] == 3 / 8
    assert report["entries"] == 3  # embeddings a (refreshed in place), embeddings b, infer
    assert report["size_bytes"] > 0 and report["limit_bytes"] == 1 << 30
    assert report["upstream_seconds_saved"] >= 3 * UPSTREAM_DELAY
    assert report["upstream_seconds"] >= 5 * UPSTREAM_DELAY  # 3 misses, 1 bypass, 1 refresh went upstream
    assert report["bytes_served_from_cache"] > 0
    routes = {(r["route"], r["model"]): r for r in report["routes"]}
    assert set(routes) == {(EMBEDDINGS, "mini"), (INFER, "digits")}
    embeddings, infer = routes[(EMBEDDINGS, "mini")], routes[(INFER, "digits")]
    assert [embeddings[n] for n in ("requests", "hits", "misses", "bypasses", "refreshes")] == [6, 2, 2, 1, 1]
    assert [infer[n] for n in ("requests", "hits", "misses", "bypasses", "refreshes")] == [2, 1, 1, 0, 0]
    assert embeddings["origin"] == infer["origin"] and report["origins"][0]["requests"] == 8


def _check_metrics(text: str, report: dict[str, Any]) -> None:
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    origin = report["routes"][0]["origin"]

    def requests_total(route: str, model: str, decision: str) -> float:
        labels = {"origin": origin, "route": route, "model": model, "decision": decision}
        return samples[("forward_proxy_cache_requests_total", tuple(sorted(labels.items())))]

    decisions = ("hit", "miss", "bypass", "refresh", "coalesced", "stale")
    assert [requests_total(EMBEDDINGS, "mini", d) for d in decisions] == [2, 2, 1, 1, 0, 0]
    assert [requests_total(INFER, "digits", d) for d in decisions] == [1, 1, 0, 0, 0, 0]
    by_name: dict[str, float] = {}
    for (name, _), value in samples.items():
        by_name[name] = by_name.get(name, 0.0) + value
    assert by_name["forward_proxy_cache_requests_total"] == 8
    assert by_name["forward_proxy_cache_stores_total"] == 4
    assert by_name["forward_proxy_cache_entries"] == 3
    assert by_name["forward_proxy_cache_hit_ratio"] == 3 / 8
    assert by_name["forward_proxy_cache_saved_upstream_seconds_total"] == pytest.approx(
        report["upstream_seconds_saved"]
    )


def _check_table(text: str, report: dict[str, Any]) -> None:
    summary, routes = parse_table(text)
    expected = {"requests": "8", "hits": "3", "misses": "3", "bypasses": "1", "refreshes": "1", "stores": "4"}
    assert {label: summary[label] for label in expected} == expected
    assert (summary["hit ratio"], summary["entries"]) == ("37.5%", "3")
    assert summary["upstream time saved"] == f"{report['upstream_seconds_saved']:.3f} s"
    rows = {(row["ROUTE"], row["MODEL"]): row for row in routes}
    columns = ("REQUESTS", "HITS", "MISSES", "BYPASS", "REFRESH", "HIT RATIO")
    assert [rows[(EMBEDDINGS, "mini")][c] for c in columns] == ["6", "2", "2", "1", "1", "33.3%"]
    assert [rows[(INFER, "digits")][c] for c in columns] == ["2", "1", "1", "0", "0", "50.0%"]


def _check_dashboard(admin: str, tmp_path: Path, report: dict[str, Any]) -> None:
    texts = texts_by_id(dump_dom(admin, tmp_path / "chromium"))
    assert texts["connection"].startswith("live")
    assert (texts["kpi-requests"], texts["kpi-hit-ratio"]) == ("8", "37.5%")
    assert texts["kpi-hits-detail"] == "3 hits of 8"
    assert texts["kpi-requests-detail"] == "3 misses · 1 bypass"
    assert texts["kpi-fill-detail"].startswith("3 entries · ")
    assert texts["event-stores"] == "4"
    routes = texts["routes-body"]
    assert f"{EMBEDDINGS} mini 6 2 2 2 33.3%" in routes
    assert f"{INFER} digits 2 1 1 0 50.0%" in routes
    screenshot(admin, tmp_path / "chromium", tmp_path / "dashboard.png")


def _check_access_log(path: Path, report: dict[str, Any]) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["cache"] for line in lines] == [*KNOWN_DECISIONS, None]
    assert all(line["status"] == 200 for line in lines)
    assert len({line["key"] for line in lines[:3]}) == 1  # the same request, the same key id
    saved = sum(line["saved_seconds"] for line in lines if line["cache"] == "HIT")
    assert saved == pytest.approx(report["upstream_seconds_saved"], abs=1e-5)
    assert all(line["upstream_seconds"] is None for line in lines if line["cache"] == "HIT")
    assert all(line["upstream_seconds"] >= UPSTREAM_DELAY for line in lines if line["cache"] == "MISS")
    assert lines[-1]["path"] == "/health" and lines[-1]["route"] is None
    assert len({line["pseudonym"] for line in lines}) == 1 and lines[0]["pseudonym"]  # one client, masked
    assert "127.0.0.1" not in "".join(json.dumps(line).replace(line["origin"], "") for line in lines)


def _send(proxy: RunningProxy, upstream: Upstream, text: str) -> str:
    answer = proxy.session().post(upstream.url("/v1/embeddings"), json={"input": text}, timeout=30)
    assert answer.status_code == 200
    return answer.headers["X-Cache"]


@pytest.mark.slow
def test_two_proxies_on_one_cache_directory_add_up(tmp_path: Path, upstream: Upstream) -> None:
    cache_dir = tmp_path / "shared"
    first = start_proxy(tmp_path / "first", cache_dir=cache_dir)
    try:
        second = start_proxy(tmp_path / "second", cache_dir=cache_dir)
        try:
            assert [_send(first, upstream, "x"), _send(first, upstream, "x")] == ["MISS", "HIT"]
            assert [_send(second, upstream, "x"), _send(second, upstream, "y")] == ["HIT", "MISS"]
            report = _report_when(cache_dir, 4)
        finally:
            second.stop()
    finally:
        first.stop()
    assert (report["requests"], report["hits"], report["misses"], report["entries"]) == (4, 2, 2, 2)
    assert upstream.calls("/v1/embeddings") == 2


@pytest.mark.slow
def test_counts_survive_a_restart(tmp_path: Path, upstream: Upstream) -> None:
    with start_proxy(tmp_path) as proxy:
        assert [_send(proxy, upstream, "x"), _send(proxy, upstream, "x")] == ["MISS", "HIT"]
        cache_dir = proxy.cache_dir
    stopped = json.loads(_stats(cache_dir, "--json"))  # the proxy wrote its last counts when it stopped
    assert (stopped["requests"], stopped["hits"], stopped["misses"]) == (2, 1, 1)
    with start_proxy(tmp_path, cache_dir=cache_dir) as proxy:
        assert _send(proxy, upstream, "x") == "HIT"
        report = _report_when(cache_dir, 3)
    assert (report["requests"], report["hits"], report["misses"]) == (3, 2, 1)
    assert report["started_at"] == stopped["started_at"]


@pytest.mark.slow
def test_purge_removes_exactly_what_it_names(tmp_path: Path, upstream: Upstream) -> None:
    with start_proxy(tmp_path) as proxy:
        assert [_send(proxy, upstream, "x"), _send(proxy, upstream, "y")] == ["MISS", "MISS"]
        infer = proxy.session().post(upstream.url("/v2/models/digits/infer"), json={"inputs": []}, timeout=30)
        assert infer.headers["X-Cache"] == "MISS"
        argv = ["cache", "purge", "--route", "/v2/*", "--cache-dir", str(proxy.cache_dir)]
        purge = subprocess.run(
            [console_script("forward-proxy"), *argv], capture_output=True, text=True, timeout=60
        )
        assert purge.returncode == 0, purge.stderr
        removed = purge.stdout.splitlines()
        assert removed[0].startswith(f"removed {infer.headers['X-Cache-Key']}  ")
        assert removed[-1].startswith("removed 1 entry ")
        again = proxy.session().post(upstream.url("/v2/models/digits/infer"), json={"inputs": []}, timeout=30)
        assert again.headers["X-Cache"] == "MISS"  # purged: computed again
        assert [_send(proxy, upstream, "x"), _send(proxy, upstream, "y")] == ["HIT", "HIT"]  # kept
