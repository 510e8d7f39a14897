"""The statistics report: one stable JSON object, and the table `forward-proxy stats` prints.

`build_report(snapshot, volume, now=...)` turns the shared counters (a `Snapshot`) and the cache's
current volume into a plain JSON object. `forward-proxy stats --json`, the admin listener's `/stats`
and the dashboard all serve exactly this object, and `render_table` prints it for a person, so the
three never disagree. Pure code: no I/O, no mitmproxy.

The object (`schema_version` 1; fields are only ever added, never renamed or removed):

    schema_version          1
    generated_at            epoch seconds when the report was made
    started_at              epoch seconds when counting started (kept across restarts; `stats --reset`
                            starts it again)
    elapsed_seconds         generated_at - started_at
    requests ... bytes_served_from_cache
                            every name of `COUNT_NAMES`, totals over all origins and routes (integers)
    upstream_seconds_saved  seconds of upstream time the answers served from the cache originally took
    upstream_seconds        seconds actually spent upstream on requests a cache rule matched
    hit_ratio               hits / requests, 0.0 before the first request
    partials                requests answered `X-Cache: PARTIAL` (a batch partly from the cache); they
                            are also counted in `misses`, since they went upstream
    rows                    rows of the batches answered row by row (per-item caching), any decision
    rows_from_cache         of those, rows served from the cache
    rows_upstream           of those, rows sent upstream; `rows - rows_from_cache - rows_upstream` were
                            shared: repeated inside their batch, computed by a batch in flight, or
                            waited for (COALESCED); or refused (`only-if-cached` and not cached)
    row_hit_ratio           rows_from_cache / rows, 0.0 before the first row
    completion_tokens_saved tokens the chat or completion model did not generate again: for every
                            completion answered from the cache (HIT, STALE or COALESCED), the
                            `usage.completion_tokens` of its stored answer. The generation time saved is
                            `upstream_seconds_saved` of the same route and model
    entries, size_bytes     what the cache holds now
    limit_bytes             its size limit, null when unlimited
    fill_ratio              size_bytes / limit_bytes, null when unlimited
    origins                 one object per origin: origin, the counts, hit_ratio, the row figures,
                            completion_tokens_saved
    routes                  one object per (origin, route, model): origin, route, model (null when the
                            requests name none), the counts, hit_ratio, the row figures,
                            completion_tokens_saved; busiest first

Events that belong to no request (for example an eviction) are counted under origin "" and route "".
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from forward_proxy.cache.units import format_duration, format_size
from forward_proxy.stats.counters import (
    COUNT_NAMES,
    GENERATION_NAMES,
    ROW_NAMES,
    SECONDS_NAMES,
    Counters,
    Snapshot,
)
from forward_proxy.store.base import CacheStore, CounterStore, Volume

REPORT_SCHEMA_VERSION = 1


def hit_ratio(hits: float, requests: float) -> float:
    """Share of requests answered by a fresh cache hit; 0.0 when there were none."""
    return hits / requests if requests > 0 else 0.0


def row_hit_ratio(rows_from_cache: float, rows: float) -> float:
    """Share of batch rows served from the cache; 0.0 when no batch was answered row by row."""
    return rows_from_cache / rows if rows > 0 else 0.0


def read_report(cache: CacheStore, counters: CounterStore, now: float | None = None) -> dict[str, Any]:
    """The report of a live cache: its counters and its current volume (may raise `StoreError`)."""
    return build_report(Counters(counters).snapshot(), cache.volume(), now=now)


def build_report(snapshot: Snapshot, volume: Volume, now: float | None = None) -> dict[str, Any]:
    generated_at = time.time() if now is None else now
    routes = sorted(
        (_row(rc.counts, origin=rc.origin, route=rc.route, model=rc.model) for rc in snapshot.routes),
        key=lambda row: (-row["requests"], row["origin"], row["route"], row["model"] or ""),
    )
    by_origin: dict[str, list[Mapping[str, float]]] = {}
    for rc in snapshot.routes:
        by_origin.setdefault(rc.origin, []).append(rc.counts)
    origins = sorted(
        (_row(_sum(counts), origin=origin) for origin, counts in by_origin.items()),
        key=lambda row: (-row["requests"], row["origin"]),
    )
    limit = volume.limit_bytes
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "generated_at": round(generated_at, 3),
        "started_at": round(snapshot.started_at, 3),
        "elapsed_seconds": round(max(0.0, generated_at - snapshot.started_at), 3),
        **_row(_sum(rc.counts for rc in snapshot.routes)),  # the totals and their hit ratio
        "entries": volume.entries,
        "size_bytes": volume.size_bytes,
        "limit_bytes": limit,
        "fill_ratio": volume.size_bytes / limit if limit else None,
        "origins": origins,
        "routes": routes,
    }


def _counts(raw: Mapping[str, float]) -> dict[str, Any]:
    counts: dict[str, Any] = {name: int(raw.get(name, 0)) for name in COUNT_NAMES}
    counts.update({name: round(float(raw.get(name, 0.0)), 6) for name in SECONDS_NAMES})
    return counts


def _sum(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for row in rows:
        for name, value in row.items():
            total[name] = total.get(name, 0) + value
    return total


def _row(raw: Mapping[str, float], **labels: str | None) -> dict[str, Any]:
    counts = _counts(raw)
    rows = {name: int(raw.get(name, 0)) for name in ROW_NAMES}
    # A PARTIAL answer is counted once, as `partials` (so every counter only grows, also where Prometheus
    # shows misses without them); the report's `misses` include them, since they went upstream too.
    counts["misses"] += rows["partials"]
    return {
        **labels,
        **counts,
        "hit_ratio": hit_ratio(counts["hits"], counts["requests"]),
        **rows,
        "row_hit_ratio": row_hit_ratio(rows["rows_from_cache"], rows["rows"]),
        **{name: int(raw.get(name, 0)) for name in GENERATION_NAMES},
    }


# ---------------------------------------------------------------------------------------------------
# The table a person reads in a terminal.

_SUMMARY_ROWS = (
    ("requests", "requests"),
    ("hits", "hits"),
    ("misses", "misses"),
    ("bypasses", "bypasses"),
    ("refreshes", "refreshes"),
    ("coalesced", "coalesced waiters"),
    ("stale", "stale answers"),
    ("stores", "stores"),
    ("store_errors", "store errors"),
    ("evictions", "evictions"),
    ("upstream_errors", "upstream errors"),
)

_ROUTE_COLUMNS = (
    ("requests", "REQUESTS"),
    ("hits", "HITS"),
    ("misses", "MISSES"),
    ("bypasses", "BYPASS"),
    ("refreshes", "REFRESH"),
    ("coalesced", "COALESCED"),
    ("stale", "STALE"),
)


def render_table(report: Mapping[str, Any]) -> str:
    """The report as the text `forward-proxy stats` prints: a summary, then one line per route."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report["started_at"]))
    lines = [f"Cache statistics, counting since {started} ({format_duration(report['elapsed_seconds'])})", ""]
    summary: list[tuple[str, str]] = [(label, str(report[name])) for name, label in _SUMMARY_ROWS]
    summary.insert(1, ("hit ratio", format_percent(report["hit_ratio"])))
    if report["rows"]:  # only where batches were answered row by row, so the table stays short otherwise
        after_decisions = [label for label, _ in summary].index("stores")
        summary[after_decisions:after_decisions] = [
            ("partial answers", str(report["partials"])),
            ("batch rows", format_rows(report)),
        ]
    summary.append(("upstream time saved", format_seconds(report["upstream_seconds_saved"])))
    if report["completion_tokens_saved"]:  # only once a completion was answered from the cache
        summary.append(("tokens saved", str(report["completion_tokens_saved"])))
    summary += [
        ("upstream time spent", format_seconds(report["upstream_seconds"])),
        ("served from cache", format_size(report["bytes_served_from_cache"])),
        ("entries", str(report["entries"])),
        ("size", _format_fill(report)),
    ]
    width = max(len(label) for label, _ in summary)
    lines += [f"  {label:<{width}}  {value}" for label, value in summary]

    routes = [row for row in report["routes"] if row["origin"] or row["route"]]
    lines.append("")
    if not routes:
        lines.append("No cached route has seen a request yet.")
        return "\n".join(lines) + "\n"
    with_rows = bool(report["rows"])  # the PARTIAL and ROWS columns only where batches were answered in rows
    with_tokens = bool(report["completion_tokens_saved"])  # TOKENS SAVED only once a completion was a hit
    header = [
        "ORIGIN",
        "ROUTE",
        "MODEL",
        *(title for _, title in _ROUTE_COLUMNS),
        *(("PARTIAL", "ROWS") if with_rows else ()),
        "HIT RATIO",
        "SAVED",
        *(("TOKENS SAVED",) if with_tokens else ()),
    ]
    body = [
        [
            row["origin"],
            row["route"],
            row["model"] or "-",
            *(str(row[name]) for name, _ in _ROUTE_COLUMNS),
            *((str(row["partials"]), _format_route_rows(row)) if with_rows else ()),
            format_percent(row["hit_ratio"]),
            format_seconds(row["upstream_seconds_saved"]),
            *((str(row["completion_tokens_saved"] or "-"),) if with_tokens else ()),
        ]
        for row in routes
    ]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    text_columns = 3  # origin, route and model read left-aligned; numbers right-aligned
    for cells in [header, *body]:
        padded = [
            cell.ljust(widths[i]) if i < text_columns else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines) + "\n"


def format_rows(report: Mapping[str, Any]) -> str:
    """The rows of batches answered row by row: `6: 2 from cache (33.3%), 4 upstream`, and any shared."""
    shared = report["rows"] - report["rows_from_cache"] - report["rows_upstream"]
    text = (
        f"{report['rows']}: {report['rows_from_cache']} from cache ({format_percent(report['row_hit_ratio'])}), "
        f"{report['rows_upstream']} upstream"
    )
    return text + (f", {shared} shared" if shared else "")


def _format_route_rows(row: Mapping[str, Any]) -> str:
    """Rows from the cache / rows, as the `X-Cache-Rows` header writes them; `-` for a route without."""
    return f"{row['rows_from_cache']}/{row['rows']}" if row["rows"] else "-"


def _format_fill(report: Mapping[str, Any]) -> str:
    size = format_size(report["size_bytes"])
    if report["limit_bytes"] is None:
        return f"{size} (no limit)"
    return f"{size} of {format_size(report['limit_bytes'])} ({format_percent(report['fill_ratio'])})"


def format_percent(ratio: float) -> str:
    return f"{ratio * 100:.1f}%"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3f} s"
    return f"{seconds:.1f} s ({format_duration(seconds)})"
