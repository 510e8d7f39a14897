"""The report object and its table, from real `Counters` over an in-memory counter store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from forward_proxy.stats.counters import COUNT_NAMES, SECONDS_NAMES, Counters
from forward_proxy.stats.report import build_report, hit_ratio, render_table
from forward_proxy.store.base import Volume
from forward_proxy.store.memory import MemoryCounterStore
from tests.forward_proxy.stats.table import parse_table

M1 = "http://127.0.0.1:8000"
M2 = "http://127.0.0.1:9000"
EMBEDDINGS = "POST /v1/embeddings"
INFER = "POST /v2/models/*/infer"
CHAT = "POST /v1/chat/completions"


def _counters() -> Counters:
    """7 requests on M1 embeddings (4 hits), 2 on M1 infer, 1 on M2 embeddings, and two evictions."""
    counters = Counters(MemoryCounterStore())

    def count(origin: str, route: str, model: str | None, **amounts: float) -> None:
        for name, amount in amounts.items():
            counters.count(name, origin=origin, route=route, model=model, amount=amount)

    count(M1, EMBEDDINGS, "mini", requests=7, hits=4, misses=2, bypasses=1, stores=2)
    count(
        M1,
        EMBEDDINGS,
        "mini",
        bytes_served_from_cache=4096,
        upstream_seconds_saved=2.5,
        upstream_seconds=1.25,
    )
    count(M1, INFER, "digits", requests=2, misses=1, stale=1, stores=1, store_errors=1, upstream_errors=1)
    count(M1, INFER, "digits", upstream_seconds_saved=0.125)
    count(M2, EMBEDDINGS, None, requests=1, coalesced=1)
    count("", "", None, evictions=2)
    return counters


def _report(**volume: Any) -> dict[str, Any]:
    snapshot = _counters().snapshot()
    shape = {"entries": 3, "size_bytes": 2048, "limit_bytes": 8192, **volume}
    return build_report(snapshot, Volume(**shape), now=snapshot.started_at + 3725.0)


def test_totals_add_up_over_every_route() -> None:
    report = _report()
    assert report["schema_version"] == 1
    assert report["elapsed_seconds"] == 3725.0
    totals = {name: report[name] for name in (*COUNT_NAMES, *SECONDS_NAMES)}
    assert totals == {
        "requests": 10,
        "hits": 4,
        "misses": 3,
        "bypasses": 1,
        "refreshes": 0,
        "coalesced": 1,
        "stale": 1,
        "stores": 3,
        "store_errors": 1,
        "evictions": 2,
        "upstream_errors": 1,
        "bytes_served_from_cache": 4096,
        "upstream_seconds_saved": 2.625,
        "upstream_seconds": 1.25,
    }
    assert report["hit_ratio"] == 0.4
    assert (report["entries"], report["size_bytes"], report["limit_bytes"], report["fill_ratio"]) == (
        3,
        2048,
        8192,
        0.25,
    )


def test_routes_are_per_origin_route_and_model_busiest_first() -> None:
    routes = _report()["routes"]
    assert [(r["origin"], r["route"], r["model"], r["requests"]) for r in routes] == [
        (M1, EMBEDDINGS, "mini", 7),
        (M1, INFER, "digits", 2),
        (M2, EMBEDDINGS, None, 1),
        ("", "", None, 0),
    ]
    embeddings = routes[0]
    assert (embeddings["hits"], embeddings["misses"], embeddings["bypasses"]) == (4, 2, 1)
    assert embeddings["hit_ratio"] == pytest.approx(4 / 7)
    assert embeddings["upstream_seconds_saved"] == 2.5
    assert routes[3]["evictions"] == 2


def test_origins_sum_their_routes() -> None:
    origins = {o["origin"]: o for o in _report()["origins"]}
    assert (origins[M1]["requests"], origins[M1]["hits"], origins[M1]["stale"]) == (9, 4, 1)
    assert origins[M1]["upstream_seconds_saved"] == 2.625
    assert origins[M1]["hit_ratio"] == pytest.approx(4 / 9)
    assert (origins[M2]["requests"], origins[M2]["coalesced"], origins[M2]["hit_ratio"]) == (1, 1, 0.0)


def test_the_report_is_plain_json() -> None:
    report = _report()
    assert json.loads(json.dumps(report)) == report


def test_an_unlimited_cache_has_no_fill_ratio() -> None:
    report = _report(limit_bytes=None)
    assert report["limit_bytes"] is None and report["fill_ratio"] is None
    summary, _ = parse_table(render_table(report))
    assert summary["size"] == "2.0 KiB (no limit)"


def test_an_empty_cache_reports_zeros() -> None:
    snapshot = Counters(MemoryCounterStore()).snapshot()
    report = build_report(snapshot, Volume(0, 0, 100), now=snapshot.started_at)
    assert (report["requests"], report["hit_ratio"], report["routes"]) == (0, 0.0, [])
    assert "No cached route has seen a request yet." in render_table(report)


def test_hit_ratio_of_nothing_is_zero() -> None:
    assert hit_ratio(0, 0) == 0.0
    assert hit_ratio(1, 4) == 0.25


def test_the_table_shows_the_same_numbers() -> None:
    text = render_table(_report())
    assert text.startswith("Cache statistics, counting since ")
    assert "(1h2m5s)" in text.splitlines()[0]
    summary, routes = parse_table(text)
    assert summary["requests"] == "10"
    assert summary["hit ratio"] == "40.0%"
    assert (summary["hits"], summary["misses"], summary["bypasses"], summary["refreshes"]) == (
        "4",
        "3",
        "1",
        "0",
    )
    assert (summary["coalesced waiters"], summary["stale answers"]) == ("1", "1")
    assert (summary["stores"], summary["store errors"], summary["evictions"]) == ("3", "1", "2")
    assert summary["upstream errors"] == "1"
    assert summary["upstream time saved"] == "2.625 s"
    assert summary["served from cache"] == "4.0 KiB"
    assert summary["entries"] == "3"
    assert summary["size"] == "2.0 KiB of 8.0 KiB (25.0%)"
    assert routes[0] == {
        "ORIGIN": M1,
        "ROUTE": EMBEDDINGS,
        "MODEL": "mini",
        "REQUESTS": "7",
        "HITS": "4",
        "MISSES": "2",
        "BYPASS": "1",
        "REFRESH": "0",
        "COALESCED": "0",
        "STALE": "0",
        "HIT RATIO": "57.1%",
        "SAVED": "2.500 s",
    }
    assert routes[2]["MODEL"] == "-"
    assert len(routes) == 3  # the unattributed evictions are in the totals, not a route line


def _report_with_rows() -> dict[str, Any]:
    """`_counters()` plus batches on M2: 2 PARTIAL answers among 3 misses (the counters keep them apart: 1
    miss, 2 partials), 12 rows (5 cached, 6 upstream)."""
    counters = _counters()
    amounts = {"requests": 4, "hits": 1, "misses": 1, "partials": 2}
    amounts |= {"rows": 12, "rows_from_cache": 5, "rows_upstream": 6}
    for name, amount in amounts.items():
        counters.count(name, origin=M2, route=EMBEDDINGS, model="mini", amount=amount)
    snapshot = counters.snapshot()
    return build_report(snapshot, Volume(3, 2048, 8192), now=snapshot.started_at + 10.0)


def test_row_figures_are_reported_overall_per_origin_and_per_route() -> None:
    report = _report_with_rows()
    figures = ("partials", "rows", "rows_from_cache", "rows_upstream", "row_hit_ratio")
    assert [report[name] for name in figures] == [2, 12, 5, 6, 5 / 12]
    assert (report["requests"], report["misses"]) == (14, 6)  # a PARTIAL is a miss too
    origins = {o["origin"]: o for o in report["origins"]}
    assert [origins[M2][name] for name in figures] == [2, 12, 5, 6, 5 / 12]
    assert [origins[M1][name] for name in figures] == [0, 0, 0, 0, 0.0]
    routes = {(r["origin"], r["route"], r["model"]): r for r in report["routes"]}
    assert [routes[(M2, EMBEDDINGS, "mini")][name] for name in figures] == [2, 12, 5, 6, 5 / 12]
    assert [routes[(M1, EMBEDDINGS, "mini")][name] for name in figures] == [0, 0, 0, 0, 0.0]


def _report_with_completions() -> dict[str, Any]:
    """`_counters()` plus chat completions on M1 for two models: smol 1 miss, 2 hits and 1 coalesced waiter
    (32 tokens each), tiny 1 hit (5 tokens); the hits saved 1.5 s each."""
    counters = _counters()
    for model, amounts in (
        ("smol", {"requests": 4, "misses": 1, "hits": 2, "coalesced": 1, "upstream_seconds_saved": 3.0}),
        ("tiny", {"requests": 1, "hits": 1, "upstream_seconds_saved": 1.5}),
    ):
        for name, amount in amounts.items():
            counters.count(name, origin=M1, route=CHAT, model=model, amount=amount)
    for model, tokens in (("smol", 32), ("smol", 32), ("smol", 32), ("tiny", 5)):
        counters.count("completion_tokens_saved", origin=M1, route=CHAT, model=model, amount=tokens)
    snapshot = counters.snapshot()
    return build_report(snapshot, Volume(3, 2048, 8192), now=snapshot.started_at + 10.0)


def test_completion_tokens_saved_are_reported_overall_per_origin_and_per_model() -> None:
    report = _report_with_completions()
    assert report["completion_tokens_saved"] == 101
    origins = {o["origin"]: o for o in report["origins"]}
    assert (origins[M1]["completion_tokens_saved"], origins[M2]["completion_tokens_saved"]) == (101, 0)
    routes = {(r["route"], r["model"]): r for r in report["routes"] if r["origin"] == M1}
    smol, tiny = routes[(CHAT, "smol")], routes[(CHAT, "tiny")]
    assert (smol["completion_tokens_saved"], smol["upstream_seconds_saved"]) == (96, 3.0)
    assert (tiny["completion_tokens_saved"], tiny["upstream_seconds_saved"]) == (5, 1.5)
    assert routes[(EMBEDDINGS, "mini")]["completion_tokens_saved"] == 0
    assert set(report) == set(_report())  # the same keys, whatever was counted


def test_without_completions_from_the_cache_the_table_has_no_token_line_or_column() -> None:
    summary, routes = parse_table(render_table(_report()))
    assert "tokens saved" not in summary and "TOKENS SAVED" not in routes[0]


def test_the_table_shows_the_completion_tokens_saved() -> None:
    summary, routes = parse_table(render_table(_report_with_completions()))
    assert summary["tokens saved"] == "101"
    labels = list(summary)
    assert labels.index("tokens saved") == labels.index("upstream time saved") + 1
    rows = {(row["ROUTE"], row["MODEL"]): row for row in routes}
    assert (rows[(CHAT, "smol")]["SAVED"], rows[(CHAT, "smol")]["TOKENS SAVED"]) == ("3.000 s", "96")
    assert (rows[(CHAT, "tiny")]["SAVED"], rows[(CHAT, "tiny")]["TOKENS SAVED"]) == ("1.500 s", "5")
    assert rows[(EMBEDDINGS, "mini")]["TOKENS SAVED"] == "-"


def test_row_figures_only_add_keys() -> None:
    before = set(_report())
    after = set(_report_with_rows())
    assert after == before  # the same keys, whatever was counted
    assert {"partials", "rows", "rows_from_cache", "rows_upstream", "row_hit_ratio"} <= after
    for row in _report()["routes"]:
        assert (row["rows"], row["row_hit_ratio"]) == (0, 0.0)


def test_without_rows_the_table_has_no_row_lines_or_columns() -> None:
    summary, routes = parse_table(render_table(_report()))
    assert "batch rows" not in summary and "partial answers" not in summary
    assert "PARTIAL" not in routes[0] and "ROWS" not in routes[0]


def test_the_table_shows_the_rows_of_batches() -> None:
    summary, routes = parse_table(render_table(_report_with_rows()))
    assert summary["partial answers"] == "2"
    assert summary["batch rows"] == "12: 5 from cache (41.7%), 6 upstream, 1 shared"
    rows = {(row["ORIGIN"], row["ROUTE"], row["MODEL"]): row for row in routes}
    assert (rows[(M2, EMBEDDINGS, "mini")]["PARTIAL"], rows[(M2, EMBEDDINGS, "mini")]["ROWS"]) == (
        "2",
        "5/12",
    )
    assert (rows[(M1, EMBEDDINGS, "mini")]["PARTIAL"], rows[(M1, EMBEDDINGS, "mini")]["ROWS"]) == ("0", "-")
    assert rows[(M2, EMBEDDINGS, "mini")]["MISSES"] == "3"
