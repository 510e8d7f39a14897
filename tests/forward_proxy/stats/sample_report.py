"""A fixed statistics report, shaped as `report.build_report` makes it, for the server and metrics tests."""

from __future__ import annotations

from typing import Any

EMBEDDINGS = "POST /v1/embeddings"
INFER = "POST /v2/models/*/infer"
CHAT = "POST /v1/chat/completions"
ORIGIN = "http://127.0.0.1:8000"


def route_row(origin: str, route: str, model: str | None, **counts: float) -> dict[str, Any]:
    names = (
        "requests",
        "hits",
        "misses",
        "bypasses",
        "refreshes",
        "coalesced",
        "stale",
        "stores",
        "store_errors",
        "evictions",
        "upstream_errors",
        "bytes_served_from_cache",
    )
    row: dict[str, Any] = {"origin": origin, "route": route, "model": model}
    row.update({name: int(counts.get(name, 0)) for name in names})
    row["upstream_seconds_saved"] = float(counts.get("upstream_seconds_saved", 0.0))
    row["upstream_seconds"] = float(counts.get("upstream_seconds", 0.0))
    row["hit_ratio"] = row["hits"] / row["requests"] if row["requests"] else 0.0
    row.update(
        {name: int(counts.get(name, 0)) for name in ("partials", "rows", "rows_from_cache", "rows_upstream")}
    )
    row["row_hit_ratio"] = row["rows_from_cache"] / row["rows"] if row["rows"] else 0.0
    row["completion_tokens_saved"] = int(counts.get("completion_tokens_saved", 0))
    return row


def sample_report(generated_at: float = 1_700_000_100.0) -> dict[str, Any]:
    """7 requests on embeddings (4 hits, 2 misses of which 1 PARTIAL, 1 bypass; 10 batch rows: 6 from the
    cache, 3 upstream, 1 shared) and 3 on infer (1 hit, 1 miss, 1 stale)."""
    routes = [
        route_row(
            ORIGIN,
            EMBEDDINGS,
            "mini",
            requests=7,
            hits=4,
            misses=2,
            bypasses=1,
            partials=1,
            rows=10,
            rows_from_cache=6,
            rows_upstream=3,
            stores=2,
            bytes_served_from_cache=4000,
            upstream_seconds_saved=2.0,
            upstream_seconds=1.5,
        ),
        route_row(
            ORIGIN,
            INFER,
            "digits",
            requests=3,
            hits=1,
            misses=1,
            stale=1,
            stores=1,
            store_errors=1,
            upstream_errors=1,
            bytes_served_from_cache=300,
            upstream_seconds_saved=0.25,
            upstream_seconds=0.5,
        ),
        route_row("", "", None, evictions=2),
    ]
    return _report(routes, generated_at)


def sample_report_with_chat(generated_at: float = 1_700_000_100.0) -> dict[str, Any]:
    """`sample_report` and 4 chat completions (1 miss, 2 hits, 1 coalesced waiter: 32 tokens each saved)."""
    report = sample_report(generated_at)
    chat = route_row(
        ORIGIN,
        CHAT,
        "smol",
        requests=4,
        hits=2,
        misses=1,
        coalesced=1,
        stores=1,
        bytes_served_from_cache=1200,
        upstream_seconds_saved=3.0,
        upstream_seconds=1.5,
        completion_tokens_saved=96,
    )
    embeddings, *others = report["routes"]
    return _report([embeddings, chat, *others], generated_at)  # busiest first


def _report(routes: list[dict[str, Any]], generated_at: float) -> dict[str, Any]:
    totals = {
        name: sum(row[name] for row in routes)
        for name in routes[0]
        if name not in ("origin", "route", "model", "hit_ratio", "row_hit_ratio")
    }
    return {
        "schema_version": 1,
        "generated_at": generated_at,
        "started_at": generated_at - 100.0,
        "elapsed_seconds": 100.0,
        **totals,
        "hit_ratio": totals["hits"] / totals["requests"],
        "row_hit_ratio": totals["rows_from_cache"] / totals["rows"],
        "entries": 3,
        "size_bytes": 3072,
        "limit_bytes": 1 << 20,
        "fill_ratio": 3072 / (1 << 20),
        "origins": [],
        "routes": routes,
    }
