"""The dashboard rendered by a real headless Chromium from the admin server's /stats."""

from __future__ import annotations

from pathlib import Path

import pytest

from forward_proxy.stats.server import AdminServer
from tests.forward_proxy.stats.browser import dump_dom, texts_by_id
from tests.forward_proxy.stats.sample_report import sample_report, sample_report_with_chat

NONE = "\N{EN DASH}"  # what the dashboard shows where a route has no such figure

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_the_dashboard_shows_the_numbers_of_the_report(tmp_path: Path) -> None:
    server = AdminServer(sample_report, port=0, history_interval=0.05).start()
    try:
        texts = texts_by_id(dump_dom(server.url, tmp_path / "profile"))
    finally:
        server.stop()
    assert texts["connection"].startswith("live")
    assert texts["kpi-requests"] == "10"
    assert texts["kpi-hit-ratio"] == "50.0%"
    assert texts["kpi-hits-detail"] == "5 hits of 10"
    assert texts["kpi-saved"] == "2.25 s"
    assert texts["kpi-bytes"] == "4.2 KiB"
    assert texts["kpi-fill"] == "3.0 KiB"
    assert texts["kpi-fill-detail"] == "3 entries · 0.3% of 1.0 MiB"
    assert texts["event-stores"] == "3"
    assert texts["event-store-errors"] == "1"
    assert texts["event-evictions"] == "2"
    routes = texts["routes-body"]
    assert routes.startswith("http://127.0.0.1:8000 POST /v1/embeddings mini 7 4 2 1 57.1% 2.00 s")
    assert "POST /v2/models/*/infer digits 3 1 1 1 33.3% 0.25 s" in routes
    assert texts["kpi-rows"] == "60.0%"
    assert texts["kpi-rows-detail"] == "6 of 10 batch rows"
    assert texts["kpi-requests-detail"] == "3 misses · 1 partial"  # the partial is among the misses
    decisions = {name: texts[f"decision-{name}"] for name in ("hits", "misses", "partials", "stale")}
    assert decisions == {"hits": "5", "misses": "2", "partials": "1", "stale": "1"}  # a PARTIAL not twice
    assert f"57.1% 2.00 s 6/10 {NONE}" in routes  # no completion tokens saved on embeddings
    assert texts["kpi-tokens-saved"].strip() == ""  # shown only once a completion came from the cache


def test_the_dashboard_shows_the_completion_tokens_saved(tmp_path: Path) -> None:
    server = AdminServer(sample_report_with_chat, port=0, history_interval=0.05).start()
    try:
        texts = texts_by_id(dump_dom(server.url, tmp_path / "profile"))
    finally:
        server.stop()
    assert texts["kpi-saved"] == "5.25 s"
    assert texts["kpi-tokens-saved"] == "96 tokens not generated again"
    assert f"POST /v1/chat/completions smol 4 2 1 1 50.0% 3.00 s {NONE} 96" in texts["routes-body"]
