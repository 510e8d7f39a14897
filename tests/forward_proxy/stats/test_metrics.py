"""Prometheus text from a report, parsed back with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from forward_proxy.stats.metrics import render_metrics
from tests.forward_proxy.stats.sample_report import (
    CHAT,
    EMBEDDINGS,
    INFER,
    ORIGIN,
    sample_report,
    sample_report_with_chat,
)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _labels(route: str, model: str, **extra: str) -> frozenset[tuple[str, str]]:
    return frozenset({"origin": ORIGIN, "route": route, "model": model, **extra}.items())


def test_every_decision_of_every_route_is_a_labelled_request_counter() -> None:
    samples = _samples(render_metrics(sample_report).decode())
    expected = {"hit": 4, "miss": 1, "partial": 1, "bypass": 1, "refresh": 0, "coalesced": 0, "stale": 0}
    for decision, value in expected.items():
        key = ("forward_proxy_cache_requests_total", _labels(EMBEDDINGS, "mini", decision=decision))
        assert samples[key] == value
    assert samples[("forward_proxy_cache_requests_total", _labels(INFER, "digits", decision="stale"))] == 1
    total = sum(v for (name, _), v in samples.items() if name == "forward_proxy_cache_requests_total")
    assert total == 10  # a PARTIAL is counted once: as `partial`, not also as `miss`


def test_rows_are_counted_by_source_and_add_up_to_the_rows() -> None:
    samples = _samples(render_metrics(sample_report).decode())
    for source, value in {"cache": 6, "upstream": 3, "shared": 1}.items():
        assert (
            samples[("forward_proxy_cache_rows_total", _labels(EMBEDDINGS, "mini", source=source))] == value
        )
    for source in ("cache", "upstream", "shared"):
        assert samples[("forward_proxy_cache_rows_total", _labels(INFER, "digits", source=source))] == 0
    assert samples[("forward_proxy_cache_row_hit_ratio", frozenset())] == 0.6


def test_events_bytes_and_seconds_are_counters_with_units_in_their_names() -> None:
    samples = _samples(render_metrics(sample_report).decode())
    embeddings, infer = _labels(EMBEDDINGS, "mini"), _labels(INFER, "digits")
    assert samples[("forward_proxy_cache_stores_total", embeddings)] == 2
    assert samples[("forward_proxy_cache_store_errors_total", infer)] == 1
    assert samples[("forward_proxy_upstream_errors_total", infer)] == 1
    assert samples[("forward_proxy_cache_served_bytes_total", embeddings)] == 4000
    assert samples[("forward_proxy_cache_saved_upstream_seconds_total", embeddings)] == 2.0
    assert samples[("forward_proxy_upstream_seconds_total", infer)] == 0.5
    unattributed = frozenset({"origin": "", "route": "", "model": ""}.items())
    assert samples[("forward_proxy_cache_evictions_total", unattributed)] == 2


def test_completion_tokens_saved_are_a_counter_per_model() -> None:
    samples = _samples(render_metrics(sample_report_with_chat).decode())
    tokens = "forward_proxy_cache_saved_completion_tokens_total"
    assert samples[(tokens, _labels(CHAT, "smol"))] == 96
    assert samples[("forward_proxy_cache_saved_upstream_seconds_total", _labels(CHAT, "smol"))] == 3.0
    assert samples[(tokens, _labels(EMBEDDINGS, "mini"))] == 0  # a route that generates nothing


def test_gauges_describe_the_cache_now() -> None:
    samples = _samples(render_metrics(sample_report).decode())
    none: frozenset[tuple[str, str]] = frozenset()
    assert samples[("forward_proxy_cache_entries", none)] == 3
    assert samples[("forward_proxy_cache_size_bytes", none)] == 3072
    assert samples[("forward_proxy_cache_limit_bytes", none)] == 1 << 20
    assert samples[("forward_proxy_cache_hit_ratio", none)] == 0.5
    assert samples[("forward_proxy_stats_started_timestamp_seconds", none)] == 1_700_000_000.0


def test_an_unlimited_cache_has_no_limit_gauge() -> None:
    def unlimited() -> dict[str, object]:
        return {**sample_report(), "limit_bytes": None, "fill_ratio": None}

    assert "forward_proxy_cache_limit_bytes" not in render_metrics(unlimited).decode()


def test_families_are_typed_and_documented() -> None:
    families = {f.name: f for f in text_string_to_metric_families(render_metrics(sample_report).decode())}
    assert families["forward_proxy_cache_requests"].type == "counter"
    assert families["forward_proxy_cache_entries"].type == "gauge"
    assert all(family.documentation for family in families.values())
