"""`client-app` subcommands run as subprocesses against the fake model API (and the fake proxy)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tests.client_app.conftest import clean_environment, client_app
from tests.client_app.fakes import DIGITS, FakeModelApi, FakeProxy, letter_vector


def test_embed_prints_a_summary_per_text(api: FakeModelApi) -> None:
    result = client_app("--api-url", api.url, "embed", "banana", "a cab", "--values", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"POST {api.url}/v1/embeddings → 200 in ")
    assert lines[0].endswith("direct (no proxy for this URL)")
    assert "X-Model-Version: fake-1" in lines[1]
    assert (
        lines[2]
        == "model: all-MiniLM-L6-v2   embeddings: 2   dims: 26   usage: prompt_tokens=3 total_tokens=3"
    )
    # banana: a=3 b=1 n=2 -> norm sqrt(14); the fake answers in reverse order, so this also checks `index`.
    assert lines[3] == f'[0] norm={math.sqrt(14):.4f} first=[+3.0000, +1.0000, +0.0000, …] "banana"'
    assert lines[4] == f'[1] norm={math.sqrt(6):.4f} first=[+2.0000, +1.0000, +1.0000, …] "a cab"'
    assert api.requests[0].body == {"input": ["banana", "a cab"], "model": "all-MiniLM-L6-v2"}
    assert api.requests[0].headers["User-Agent"].startswith("client-app python-requests/")


def test_embed_json_prints_the_response_body(api: FakeModelApi) -> None:
    result = client_app(
        "embed", "hello", "--json", "--model", "other", env=clean_environment(MODEL_API_URL=api.url)
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["model"] == "other"
    assert body["data"][0]["embedding"] == letter_vector("hello")


def test_global_options_work_after_the_command_too(api: FakeModelApi) -> None:
    result = client_app(
        "embed", "hi", "--api-url", api.url, "-H", "Cache-Control: no-cache", "--timeout", "5"
    )
    assert result.returncode == 0, result.stderr
    assert api.requests[0].headers["Cache-Control"] == "no-cache"


def test_search_ranks_documents_by_cosine_and_batches_them(api: FakeModelApi, tmp_path: Path) -> None:
    documents = [f"filler number {i} zzz" for i in range(20)]
    documents[13] = "bbbb bbbb"
    documents[4] = "aaaa bbbb"
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(documents[:10]) + "\n\n" + "\n".join(documents[10:]) + "\n")
    result = client_app(
        "--api-url", api.url, "search", "--docs", str(docs), "bbb", "--top", "2", "--batch-size", "8"
    )
    assert result.returncode == 0, result.stderr
    rows = [
        line.split(None, 2) for line in result.stdout.splitlines() if re.match(r"\s+\d+\s+\d\.\d{3}\s", line)
    ]
    assert rows == [["1", "1.000", "bbbb bbbb"], ["2", f"{1 / math.sqrt(2):.3f}", "aaaa bbbb"]]
    sizes = [len(r.body["input"]) for r in api.requests]
    assert sizes == [8, 8, 4, 1]  # 20 documents in batches of 8 (the blank line is skipped), then the query
    assert "embedded in 3 batch(es) of up to 8 + 1 query request" in result.stdout


def test_search_reads_a_json_list_and_prints_json(api: FakeModelApi, tmp_path: Path) -> None:
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps(["xyz", "cat", "catcat dog"]))
    result = client_app("--api-url", api.url, "search", "--docs", str(docs), "cat", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [m["document"] for m in report["matches"]] == ["cat", "catcat dog", "xyz"]
    assert report["matches"][2]["score"] == 0.0
    assert report["x_cache"] == {"documents": [None], "query": None}
    assert report["requests"] == 2


def test_search_defaults_to_the_shipped_sample_documents(api: FakeModelApi) -> None:
    result = client_app("--api-url", api.url, "search", "password reset", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["document_count"] == 30
    assert sum(len(r.body["input"]) for r in api.requests) == 31


def test_second_search_through_the_proxy_is_answered_from_its_cache(
    api: FakeModelApi, proxy: FakeProxy
) -> None:
    env = clean_environment(HTTP_PROXY=proxy.url)
    first = client_app("--api-url", api.url, "search", "cat", "--json", env=env)
    second = client_app("--api-url", api.url, "search", "cat", "--json", env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout)["x_cache"] == {"documents": ["MISS", "MISS"], "query": "MISS"}
    assert json.loads(second.stdout)["x_cache"] == {"documents": ["HIT", "HIT"], "query": "HIT"}
    assert len(api.requests) == 3  # the second run never reached the model API
    text = client_app("--api-url", api.url, "search", "dog", env=env).stdout
    assert "X-Cache: documents [HIT 2]   query [MISS 1]" in text
    assert f"via proxy {proxy.url}" in text


def test_loopback_requests_go_through_http_proxy_unless_no_proxy_names_them(
    api: FakeModelApi, proxy: FakeProxy
) -> None:
    through = client_app("--api-url", api.url, "embed", "x", env=clean_environment(HTTP_PROXY=proxy.url))
    assert through.returncode == 0, through.stderr
    assert proxy.seen == [f"POST {api.url}/v1/embeddings"]
    assert "X-Cache: MISS" in through.stdout
    for no_proxy in ("127.0.0.1", "127.0.0.0/8", "*"):
        env = clean_environment(HTTP_PROXY=proxy.url, NO_PROXY=no_proxy)
        direct = client_app("--api-url", api.url, "embed", "x", env=env)
        assert direct.returncode == 0, direct.stderr
        assert "direct (no proxy for this URL)" in direct.stdout
    # `localhost` in NO_PROXY does not cover the address 127.0.0.1 (requests matches names, not resolutions).
    env = clean_environment(http_proxy=proxy.url, no_proxy="localhost")
    assert client_app("--api-url", api.url, "embed", "y", env=env).returncode == 0
    assert proxy.seen == [f"POST {api.url}/v1/embeddings"] * 2
    assert len(api.requests) == 5


def test_predict_builds_the_request_from_metadata_and_prints_classes(api: FakeModelApi) -> None:
    api.input_shape = [-1, 8, 8]
    result = client_app("--api-url", api.url, "predict", "--sample", "4")
    assert result.returncode == 0, result.stderr
    assert [r.path for r in api.requests] == ["/v2/models/digits", "/v2/models/digits/infer"]
    tensor = api.requests[1].body["inputs"][0]
    assert tensor["name"] == "pixels" and tensor["datatype"] == "FP32" and tensor["shape"] == [4, 8, 8]
    assert tensor["data"][:64] == [float(v) for v in DIGITS["samples"][0]["pixels"]]
    table = [line.split() for line in result.stdout.splitlines() if re.match(r"\s+\d+\s+\d", line)]
    labels = [str(s["label"]) for s in DIGITS["samples"][:4]]
    assert table == [[str(i), label, label, "1.000"] for i, label in enumerate(labels)]
    assert "correct: 4 of 4 built-in samples" in result.stdout


def test_predict_with_input_rows(api: FakeModelApi, tmp_path: Path) -> None:
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([[7] + [0] * 63, [13] + [1] * 63]))
    result = client_app("--api-url", api.url, "predict", "--input", f"@{rows}", "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)["outputs"][0]["data"]
    assert scores.index(1.0) == 7 and scores[10:].index(1.0) == 3
    one = client_app("--api-url", api.url, "predict", "--input", json.dumps([5] + [0] * 63))
    assert one.returncode == 0, one.stderr
    assert re.search(r"^\s+0\s+-\s+5\s+1\.000$", one.stdout, re.M)


def test_fetch_shows_status_and_headers_through_the_proxy(api: FakeModelApi, proxy: FakeProxy) -> None:
    env = clean_environment(HTTP_PROXY=proxy.url)
    result = client_app("fetch", f"{api.url}/v2/models/digits", "--body", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"GET {api.url}/v2/models/digits → 200 OK in ")
    assert lines[0].endswith(f"via proxy {proxy.url}")
    assert "X-Cache: MISS" in lines and "Content-Type: application/json" in lines
    assert json.loads(result.stdout.split("\n\n", 1)[1])["name"] == "digits"
    assert proxy.seen == [f"GET {api.url}/v2/models/digits"]


def test_fetch_of_an_error_shows_it_and_fails(api: FakeModelApi) -> None:
    result = client_app("fetch", f"{api.url}/nowhere")
    assert result.returncode == 1
    assert result.stdout.startswith(f"GET {api.url}/nowhere → 404 Not Found")
    assert result.stderr == f"client-app: {api.url}/nowhere answered 404: not_found: no route GET /nowhere\n"


def test_load_counts_add_up_and_repeats_hit_the_cache(api: FakeModelApi, proxy: FakeProxy) -> None:
    env = clean_environment(HTTP_PROXY=proxy.url)
    args = ["--api-url", api.url, "load", "--requests", "40", "--concurrency", "1", "--repeat-ratio", "0.25"]
    result = client_app(*args, "--batch", "3", "--json", "--seed", "s1", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["planned"], report["sent"], report["ok"], report["failed"]) == (40, 40, 40, 0)
    assert report["planned_repeats"] == 10
    assert report["x_cache"] == {"MISS": 30, "HIT": 10}
    assert len(api.requests) == 30 and all(len(r.body["input"]) == 3 for r in api.requests)
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p90"] <= report["latency_ms"]["p99"]
    assert set(report["latency_ms_by_cache"]) == {"MISS", "HIT"}
    assert all(q["p50"] <= q["p90"] for q in report["latency_ms_by_cache"].values())
    assert abs(report["rows_per_s"] - report["throughput_rps"] * 3) < 0.1
    # Same seed again: every request repeats one of the first run's.
    again = json.loads(client_app(*args, "--batch", "3", "--json", "--seed", "s1", env=env).stdout)
    assert again["x_cache"] == {"HIT": 40}
    assert len(api.requests) == 30


def test_load_with_concurrency_prints_a_readable_report(api: FakeModelApi) -> None:
    args = ["--api-url", api.url, "load", "--requests", "30", "--concurrency", "6", "--repeat-ratio", "0"]
    result = client_app(*args, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert len(api.requests) == 30
    assert len({r.body["input"][0] for r in api.requests}) == 30
    assert re.search(
        r"^done: 30 ok, 0 failed in \d+\.\d\d s → \d+\.\d req/s \(\d+\.\d rows/s\)$", result.stdout, re.M
    )
    assert re.search(
        r"^latency ms: p50 [\d.]+  p90 [\d.]+  p99 [\d.]+  mean [\d.]+  max [\d.]+$", result.stdout, re.M
    )
    assert "X-Cache: none 30" in result.stdout
    assert result.stderr == ""


def test_load_progress_bar_on_stderr_only_when_asked_or_on_a_terminal(api: FakeModelApi) -> None:
    forced = client_app("--api-url", api.url, "load", "--requests", "5", "--concurrency", "2", "--progress")
    assert forced.returncode == 0, forced.stderr
    assert "5/5" in forced.stderr and "5/5" not in forced.stdout
    piped = client_app("--api-url", api.url, "load", "--requests", "5", "--concurrency", "2")
    assert piped.returncode == 0 and piped.stderr == ""


def test_load_on_the_infer_route(api: FakeModelApi) -> None:
    args = ["--api-url", api.url, "load", "--route", "infer", "--requests", "12", "--repeat-ratio", "0.5"]
    report = json.loads(client_app(*args, "--batch", "2", "--json").stdout)
    assert report["ok"] == 12 and report["url"] == f"{api.url}/v2/models/digits/infer"
    infers = [r for r in api.requests if r.path.endswith("/infer")]
    assert len(infers) == 12 and all(r.body["inputs"][0]["shape"] == [2, 64] for r in infers)
    distinct = {json.dumps(r.body, sort_keys=True) for r in infers}
    assert len(distinct) == 6  # 6 new payloads, 6 repeats


def test_load_stops_at_the_duration_cap(api: FakeModelApi) -> None:
    api.delay = 0.2
    args = ["--api-url", api.url, "load", "--requests", "200", "--concurrency", "2", "--duration", "1"]
    result = client_app(*args, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["stopped_early"] is True
    assert 4 <= report["sent"] <= 16 and report["sent"] == report["ok"] == len(api.requests)
