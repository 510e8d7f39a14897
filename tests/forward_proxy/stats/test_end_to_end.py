"""A known sequence of requests through real `forward-proxy run` processes, then every place that reports it.

The counting upstream (tests/support/upstream.py) says how often it was really called; the statistics
must agree with it and with each other: `forward-proxy stats --json`, the table, `/stats`, `/metrics`
(parsed with prometheus_client), the dashboard in headless Chromium, and the access log. Embeddings are
answered as the model API answers them (tests/forward_proxy/rows/fakes.py), so the proxy caches them row
by row and the sequence includes a PARTIAL batch.
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

from tests.forward_proxy.rows.fakes import embeddings_answer
from tests.forward_proxy.stats.browser import dump_dom, screenshot, texts_by_id
from tests.forward_proxy.stats.table import parse_table
from tests.support.processes import console_script, free_port, wait_for_http
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Received, Reply, Upstream

pytestmark = pytest.mark.integration

EMBEDDINGS = "POST /v1/embeddings"
INFER = "POST /v2/models/*/infer"
UPSTREAM_DELAY = 0.1  # seconds each upstream answer takes: what every hit saves, at least
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _embeddings(received: Received) -> bytes:
    return embeddings_answer(json.loads(received.body))[0]


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        server.default(Reply(delay=UPSTREAM_DELAY))
        server.reply("/v1/embeddings", Reply(body=_embeddings, delay=UPSTREAM_DELAY))
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
    """The known sequence: 11 requests a rule matches (4 hits, 5 misses of which 1 PARTIAL, 1 bypass,
    1 refresh) and 1 other. Every embeddings request but the bypass is answered row by row: 14 rows, 6
    from the cache, 7 upstream, 1 shared (a row repeated in its batch; a single text is a batch of one
    row)."""
    embed_a = {"model": "mini", "input": "a"}
    embed_b = {"model": "mini", "input": "b"}
    tokens = {"p": [1, 2], "q": [3, 4], "r": [5, 6], "s": [7, 8]}  # token ids: rows that count themselves
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
        ("/v1/embeddings", _batch(tokens["p"], tokens["q"]), {}),  # MISS, rows 0/2
        ("/v1/embeddings", _batch(*tokens.values(), tokens["s"]), {}),  # PARTIAL 2/5: s computed once
        ("/v1/embeddings", _batch(tokens["s"], tokens["p"]), {}),  # HIT, rows 2/2
    ]
    seen = []
    for path, body, headers in calls:
        answer = session.post(upstream.url(path), json=body, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        seen.append(answer.headers["X-Cache"])
        if isinstance(body.get("input"), list):
            seen[-1] += " " + answer.headers["X-Cache-Rows"]
    assert session.get(upstream.url("/health"), timeout=30).status_code == 200  # no rule: not counted
    return seen


def _batch(*rows: list[int]) -> dict[str, Any]:
    return {"model": "mini", "input": list(rows)}


KNOWN_ANSWERS = [
    *("MISS", "HIT", "HIT", "MISS", "BYPASS", "REFRESH", "MISS", "HIT"),
    *("MISS 0/2", "PARTIAL 2/5", "HIT 2/2"),
]
KNOWN_DECISIONS = [answer.split()[0] for answer in KNOWN_ANSWERS]


@pytest.mark.slow
@pytest.mark.browser
def test_every_report_shows_exactly_the_known_sequence(tmp_path: Path, upstream: Upstream) -> None:
    admin_port = free_port()
    access_log = tmp_path / "access.jsonl"
    proxy = start_proxy(tmp_path, "--admin-port", str(admin_port), "--access-log", str(access_log))
    admin = f"http://127.0.0.1:{admin_port}/"
    try:
        wait_for_http(admin + "stats", timeout=30)
        assert _decisions(proxy.session(), upstream) == KNOWN_ANSWERS
        assert upstream.calls("/v1/embeddings") == 6 and upstream.calls("/v2/models/digits/infer") == 1

        report = _report_when(proxy.cache_dir, 11)
        _check_json(report)
        served = json.loads(_get(admin + "stats"))
        assert [served[name] for name in ("requests", *ROW_FIGURES)] == [
            11,
            *[report[n] for n in ROW_FIGURES],
        ]
        _check_metrics(_get(admin + "metrics").decode(), report)
        _check_table(_stats(proxy.cache_dir), report)
        _check_dashboard(admin, tmp_path, report)
    finally:
        proxy.stop()
    _check_access_log(access_log, report)


ROW_FIGURES = ("partials", "rows", "rows_from_cache", "rows_upstream", "row_hit_ratio")


def _check_json(report: dict[str, Any]) -> None:
    assert (report["requests"], report["hits"], report["misses"]) == (11, 4, 5)  # the PARTIAL is a miss
    assert (report["bypasses"], report["refreshes"], report["coalesced"], report["stale"]) == (1, 1, 0, 0)
    # a, b, a again (refreshed), the 2 rows of the first batch, the 2 new rows of the PARTIAL, infer
    assert (report["stores"], report["store_errors"], report["upstream_errors"]) == (8, 0, 0)
    assert report["hit_ratio"] == 4 / 11
    assert [report[name] for name in ROW_FIGURES] == [1, 14, 6, 7, 6 / 14]
    assert report["entries"] == 7  # embeddings a (refreshed in place), b, p, q, r, s and infer
    assert report["size_bytes"] > 0 and report["limit_bytes"] == 1 << 30
    assert report["upstream_seconds_saved"] >= 3 * UPSTREAM_DELAY
    assert report["upstream_seconds"] >= 7 * UPSTREAM_DELAY  # 5 misses, 1 bypass, 1 refresh went upstream
    assert report["bytes_served_from_cache"] > 0
    routes = {(r["route"], r["model"]): r for r in report["routes"]}
    assert set(routes) == {(EMBEDDINGS, "mini"), (INFER, "digits")}
    embeddings, infer = routes[(EMBEDDINGS, "mini")], routes[(INFER, "digits")]
    decisions = ("requests", "hits", "misses", "bypasses", "refreshes")
    assert [embeddings[n] for n in decisions] == [9, 3, 4, 1, 1]
    assert [infer[n] for n in decisions] == [2, 1, 1, 0, 0]
    assert [embeddings[name] for name in ROW_FIGURES] == [1, 14, 6, 7, 6 / 14]
    assert [infer[name] for name in ROW_FIGURES] == [0, 0, 0, 0, 0.0]  # infer was answered whole
    assert embeddings["origin"] == infer["origin"] and report["origins"][0]["requests"] == 11
    assert [report["origins"][0][name] for name in ROW_FIGURES] == [1, 14, 6, 7, 6 / 14]


def _check_metrics(text: str, report: dict[str, Any]) -> None:
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    origin = report["routes"][0]["origin"]

    def sample(name: str, route: str, model: str, **extra: str) -> float:
        labels = {"origin": origin, "route": route, "model": model, **extra}
        return samples[(name, tuple(sorted(labels.items())))]

    decisions = ("hit", "miss", "partial", "bypass", "refresh", "coalesced", "stale")
    requests_total = "forward_proxy_cache_requests_total"
    assert [sample(requests_total, EMBEDDINGS, "mini", decision=d) for d in decisions] == [
        3,
        3,
        1,
        1,
        1,
        0,
        0,
    ]
    assert [sample(requests_total, INFER, "digits", decision=d) for d in decisions] == [1, 1, 0, 0, 0, 0, 0]
    sources = ("cache", "upstream", "shared")
    rows_total = "forward_proxy_cache_rows_total"
    assert [sample(rows_total, EMBEDDINGS, "mini", source=s) for s in sources] == [6, 7, 1]
    assert [sample(rows_total, INFER, "digits", source=s) for s in sources] == [0, 0, 0]
    by_name: dict[str, float] = {}
    for (name, _), value in samples.items():
        by_name[name] = by_name.get(name, 0.0) + value
    assert by_name[requests_total] == 11  # every request once: a PARTIAL is not also a miss here
    assert by_name[rows_total] == 14
    assert by_name["forward_proxy_cache_stores_total"] == 8
    assert by_name["forward_proxy_cache_entries"] == 7
    assert by_name["forward_proxy_cache_hit_ratio"] == 4 / 11
    assert by_name["forward_proxy_cache_row_hit_ratio"] == 6 / 14
    assert by_name["forward_proxy_cache_saved_upstream_seconds_total"] == pytest.approx(
        report["upstream_seconds_saved"]
    )


def _check_table(text: str, report: dict[str, Any]) -> None:
    summary, routes = parse_table(text)
    expected = {
        "requests": "11",
        "hits": "4",
        "misses": "5",
        "bypasses": "1",
        "refreshes": "1",
        "stores": "8",
    }
    assert {label: summary[label] for label in expected} == expected
    assert (summary["hit ratio"], summary["entries"]) == ("36.4%", "7")
    assert summary["partial answers"] == "1"
    assert summary["batch rows"] == "14: 6 from cache (42.9%), 7 upstream, 1 shared"
    assert summary["upstream time saved"] == f"{report['upstream_seconds_saved']:.3f} s"
    rows = {(row["ROUTE"], row["MODEL"]): row for row in routes}
    columns = ("REQUESTS", "HITS", "MISSES", "BYPASS", "REFRESH", "PARTIAL", "ROWS", "HIT RATIO")
    assert [rows[(EMBEDDINGS, "mini")][c] for c in columns] == ["9", "3", "4", "1", "1", "1", "6/14", "33.3%"]
    assert [rows[(INFER, "digits")][c] for c in columns] == ["2", "1", "1", "0", "0", "0", "-", "50.0%"]


def _check_dashboard(admin: str, tmp_path: Path, report: dict[str, Any]) -> None:
    texts = texts_by_id(dump_dom(admin, tmp_path / "chromium"))
    assert texts["connection"].startswith("live")
    assert (texts["kpi-requests"], texts["kpi-hit-ratio"]) == ("11", "36.4%")
    assert texts["kpi-hits-detail"] == "4 hits of 11"
    assert texts["kpi-requests-detail"] == "5 misses · 1 partial"
    assert (texts["kpi-rows"], texts["kpi-rows-detail"]) == ("42.9%", "6 of 14 batch rows")
    assert texts["kpi-fill-detail"].startswith("7 entries · ")
    assert texts["event-stores"] == "8"
    decisions = ("hits", "misses", "partials", "bypasses", "refreshes", "coalesced", "stale")
    assert [texts[f"decision-{name}"] for name in decisions] == ["4", "4", "1", "1", "1", "0", "0"]
    routes = texts["routes-body"]
    assert f"{EMBEDDINGS} mini 9 3 4 2 33.3%" in routes and " 6/14" in routes
    assert f"{INFER} digits 2 1 1 0 50.0%" in routes
    screenshot(admin, tmp_path / "chromium", tmp_path / "dashboard.png")


def _check_access_log(path: Path, report: dict[str, Any]) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["cache"] for line in lines] == [*KNOWN_DECISIONS, None]
    batches = [line["rows"] for line in lines[-4:-1]]
    assert batches == [
        {"rows": 2, "from_cache": 0, "upstream": 2},
        {"rows": 5, "from_cache": 2, "upstream": 2},
        {"rows": 2, "from_cache": 2, "upstream": 0},
    ]
    logged_rows = [line["rows"] for line in lines if line["rows"] is not None]
    assert sum(rows["rows"] for rows in logged_rows) == report["rows"]  # no waiter, no refusal here
    assert sum(rows["from_cache"] for rows in logged_rows) == report["rows_from_cache"]
    assert sum(rows["upstream"] for rows in logged_rows) == report["rows_upstream"]
    assert all(line["status"] == 200 for line in lines)
    assert len({line["key"] for line in lines[:3]}) == 1  # the same request, the same key id
    saved = sum(line["saved_seconds"] for line in lines if line["cache"] == "HIT")
    # the PARTIAL's cached rows saved time too, which its line (upstream time, no saved_seconds) leaves out
    assert UPSTREAM_DELAY <= saved < report["upstream_seconds_saved"]
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
