"""The access log addon, driven through mitmproxy's test context: no sockets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow

from forward_proxy.cache.record import RECORD, CacheRecord, Decision, RowFigures
from forward_proxy.stats.accesslog import AccessLog, access_record
from tests.support.proxy import start_proxy
from tests.support.upstream import Upstream


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cached_flow(decision: str, upstream_seconds: float) -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flow.client_conn.peername = ("127.0.0.3", 51234)
    flow.request.timestamp_start = 1_700_000_000.25
    flow.metadata[RECORD] = CacheRecord(
        route="POST /v1/embeddings",
        origin="http://127.0.0.1:8000",
        model="mini",
        decision=Decision(decision),
        key_id="9f86d081884c7d65",
        upstream_seconds=upstream_seconds,
    )
    flow.metadata["fp.pseudonym"] = "c-3f9a1b2c"
    return flow


def test_a_hit_is_logged_with_every_field_and_never_the_client_address(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    addon = AccessLog()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, access_log=str(path))
        flow = _cached_flow("HIT", 0.183)
        addon.request(flow)
        addon.response(flow)
        addon.done()
    text = path.read_text()
    assert "127.0.0.3" not in text
    [line] = _lines(path)
    assert line == {
        "time": "2023-11-14T22:13:20.250Z",
        "pseudonym": "c-3f9a1b2c",
        "method": "GET",
        "origin": "http://127.0.0.1:8000",
        "path": "/path",
        "status": 200,
        "cache": "HIT",
        "key": "9f86d081884c7d65",
        "route": "POST /v1/embeddings",
        "model": "mini",
        "upstream_seconds": None,
        "saved_seconds": 0.183,
        "total_seconds": line["total_seconds"],
        "bytes": len(b"message"),
        "rows": None,
    }
    assert isinstance(line["total_seconds"], float) and line["total_seconds"] >= 0


def test_a_batch_answered_row_by_row_logs_its_rows() -> None:
    flow = _cached_flow("PARTIAL", 0.5)
    flow.metadata[RECORD].rows = RowFigures(rows=4, from_cache=2, upstream=2)
    record = access_record(flow, answered_by_proxy=False)
    assert (record["cache"], record["rows"]) == ("PARTIAL", {"rows": 4, "from_cache": 2, "upstream": 2})
    assert (record["upstream_seconds"], record["saved_seconds"]) == (0.5, None)


def test_a_miss_logs_the_upstream_time_and_saves_nothing() -> None:
    flow = _cached_flow("MISS", 0.5)
    record = access_record(flow, answered_by_proxy=False, now=flow.request.timestamp_start + 0.75)
    assert (record["cache"], record["upstream_seconds"], record["saved_seconds"]) == ("MISS", 0.5, None)
    assert record["total_seconds"] == 0.75


def test_an_uncached_request_measures_the_upstream_from_the_flow_timestamps() -> None:
    flow = tflow.tflow(resp=True)  # request ends at +1 s, the response starts at +2 s
    record = access_record(flow, answered_by_proxy=False)
    assert record["cache"] is None and record["key"] is None and record["pseudonym"] is None
    assert record["origin"] == "http://address:22"
    assert record["upstream_seconds"] == 1.0


def test_an_answer_the_proxy_made_itself_has_no_upstream_time() -> None:
    flow = tflow.tflow(resp=True)
    assert access_record(flow, answered_by_proxy=True)["upstream_seconds"] is None


def test_a_failed_request_is_logged_once_with_its_error(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    addon = AccessLog()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, access_log=str(path))
        failed = tflow.tflow(err=True)
        addon.request(failed)
        addon.error(failed)
        answered = tflow.tflow(resp=True)
        addon.response(answered)
        addon.error(answered)  # the client went away after the answer: still one line
    first, second = _lines(path)
    assert first["status"] is None and first["error"] == "error"
    assert second["status"] == 200 and "error" not in second


def test_the_log_is_off_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    addon = AccessLog()
    with taddons.context(addon):
        addon.response(tflow.tflow(resp=True))
    assert capsys.readouterr().err == ""


def test_dash_writes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    addon = AccessLog()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, access_log="-")
        addon.response(tflow.tflow(resp=True))
    assert json.loads(capsys.readouterr().err)["status"] == 200


def test_an_unwritable_path_is_refused_with_a_hint(tmp_path: Path) -> None:
    addon = AccessLog()
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError, match="writable file path"):
        tctx.configure(addon, access_log=str(tmp_path / "missing-dir" / "access.jsonl"))


@pytest.mark.integration
def test_forward_proxy_run_writes_one_line_per_request(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    with Upstream() as upstream, start_proxy(tmp_path, "--access-log", str(path)) as proxy:
        session = proxy.session()
        assert session.get(upstream.url("/hello?key=sk-secret-1"), timeout=30).status_code == 200
        assert session.post(upstream.url("/other"), json={"a": 1}, timeout=30).status_code == 200
    first, second = _lines(path)
    assert (first["method"], first["path"], first["status"]) == ("GET", "/hello?", 200)
    assert "sk-secret-1" not in path.read_text()  # query strings are stripped by default
    assert first["origin"] == upstream.origin
    assert (second["method"], second["path"]) == ("POST", "/other")
    assert "127.0.0.1" not in path.read_text().replace(upstream.origin, "")


@pytest.mark.integration
def test_access_log_query_keeps_query_strings(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    options = ("--access-log", str(path), "--set", "access_log_query=true")
    with Upstream() as upstream, start_proxy(tmp_path, *options) as proxy:
        assert proxy.session().get(upstream.url("/hello?x=1"), timeout=30).status_code == 200
    [line] = _lines(path)
    assert line["path"] == "/hello?x=1"
