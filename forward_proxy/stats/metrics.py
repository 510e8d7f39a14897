"""The statistics report in Prometheus' text format, for the admin listener's `/metrics`.

A custom `prometheus_client` collector reads a fresh report (see `report.py`) on every scrape, so the
numbers are the shared counters of every proxy process on the cache, never a per-process copy.
Labels: `origin` ("http://127.0.0.1:8000"), `route` (the cache rule, "POST /v1/embeddings"), `model`
("" when the request names none), on the request counter `decision`, on the row counter `source`.

    forward_proxy_cache_requests_total{origin,route,model,decision}   decision: hit | miss | partial |
                                                                       bypass | refresh | coalesced |
                                                                       stale
    forward_proxy_cache_rows_total{origin,route,model,source}         source: cache | upstream | shared
    forward_proxy_cache_stores_total{origin,route,model}
    forward_proxy_cache_store_errors_total{origin,route,model}
    forward_proxy_cache_evictions_total{origin,route,model}
    forward_proxy_upstream_errors_total{origin,route,model}
    forward_proxy_cache_served_bytes_total{origin,route,model}
    forward_proxy_cache_saved_upstream_seconds_total{origin,route,model}
    forward_proxy_upstream_seconds_total{origin,route,model}
    forward_proxy_cache_saved_completion_tokens_total{origin,route,model}
    forward_proxy_cache_entries
    forward_proxy_cache_size_bytes
    forward_proxy_cache_limit_bytes            (absent when the cache has no limit)
    forward_proxy_cache_hit_ratio              hits / requests over all routes
    forward_proxy_cache_row_hit_ratio          rows_from_cache / rows over all routes
    forward_proxy_stats_started_timestamp_seconds

The report's `misses` include its `partials` (a PARTIAL answer went upstream too); here they are apart,
`miss` is misses - partials, so the decisions of a route add up to its requests exactly, as do the
sources of its rows to its `rows` (`shared`: rows - rows_from_cache - rows_upstream).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from forward_proxy.stats.counters import DECISION_NAMES

__all__ = ["CONTENT_TYPE_LATEST", "ReportCollector", "render_metrics"]

ReportReader = Callable[[], Mapping[str, Any]]

# The `decision` label of each decision counter: the X-Cache value in lower case.
_DECISION_LABELS = {"hits": "hit", "misses": "miss", "bypasses": "bypass", "refreshes": "refresh"}

# (report field, metric name without `_total`, help text)
_ROUTE_COUNTERS = (
    ("stores", "forward_proxy_cache_stores", "Responses written to the cache."),
    ("store_errors", "forward_proxy_cache_store_errors", "Failures of the cache store (read or write)."),
    ("evictions", "forward_proxy_cache_evictions", "Entries the cache evicted to stay under its limit."),
    ("upstream_errors", "forward_proxy_upstream_errors", "Requests on cached routes the upstream failed."),
    ("bytes_served_from_cache", "forward_proxy_cache_served_bytes", "Response bytes served from the cache."),
    (
        "upstream_seconds_saved",
        "forward_proxy_cache_saved_upstream_seconds",
        "Upstream time the answers served from the cache originally took.",
    ),
    ("upstream_seconds", "forward_proxy_upstream_seconds", "Time spent upstream on cached routes."),
    (
        "completion_tokens_saved",
        "forward_proxy_cache_saved_completion_tokens",
        "Completion tokens the model did not generate again: completions answered from the cache.",
    ),
)

_LABELS = ("origin", "route", "model")


class ReportCollector(Collector):
    """Yields the metrics of one fresh report per scrape; `read` may raise, the scrape then fails."""

    def __init__(self, read: ReportReader) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        report = self._read()
        routes = report["routes"]

        requests = CounterMetricFamily(
            "forward_proxy_cache_requests",
            "Requests a cache rule matched, by the cache's decision.",
            labels=[*_LABELS, "decision"],
        )
        for row in routes:
            for decision, value in _decisions(row):
                requests.add_metric([*_labels(row), decision], value)
        yield requests

        rows = CounterMetricFamily(
            "forward_proxy_cache_rows",
            "Rows of batches answered row by row, by where each row's answer came from.",
            labels=[*_LABELS, "source"],
        )
        for row in routes:
            shared = row["rows"] - row["rows_from_cache"] - row["rows_upstream"]
            for source, value in (
                ("cache", row["rows_from_cache"]),
                ("upstream", row["rows_upstream"]),
                ("shared", shared),
            ):
                rows.add_metric([*_labels(row), source], value)
        yield rows

        for field, name, documentation in _ROUTE_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=list(_LABELS))
            for row in routes:
                family.add_metric(_labels(row), row[field])
            yield family

        yield GaugeMetricFamily("forward_proxy_cache_entries", "Entries in the cache.", report["entries"])
        yield GaugeMetricFamily(
            "forward_proxy_cache_size_bytes", "Bytes the cache holds.", report["size_bytes"]
        )
        if report["limit_bytes"] is not None:
            yield GaugeMetricFamily(
                "forward_proxy_cache_limit_bytes", "The cache's size limit.", report["limit_bytes"]
            )
        yield GaugeMetricFamily(
            "forward_proxy_cache_hit_ratio", "Hits / requests over all routes.", report["hit_ratio"]
        )
        yield GaugeMetricFamily(
            "forward_proxy_cache_row_hit_ratio",
            "Rows served from the cache / rows of batches answered row by row, all routes.",
            report["row_hit_ratio"],
        )
        yield GaugeMetricFamily(
            "forward_proxy_stats_started_timestamp_seconds",
            "When counting started (Unix time).",
            report["started_at"],
        )


def _decisions(row: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(decision label, count) of a route, PARTIAL taken out of the misses it is also counted in."""
    for field in DECISION_NAMES:
        if field == "misses":
            yield "miss", row["misses"] - row["partials"]
            yield "partial", row["partials"]
        else:
            yield _DECISION_LABELS.get(field, field), row[field]


def _labels(row: Mapping[str, Any]) -> list[str]:
    return [row["origin"], row["route"], row["model"] or ""]


def render_metrics(read: ReportReader) -> bytes:
    """The Prometheus text exposition of one fresh report."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(read))
    return generate_latest(registry)
