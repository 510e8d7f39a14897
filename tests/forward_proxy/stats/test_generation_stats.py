"""The tokens and the generation time that completions from the cache saved, through a real `forward-proxy
run` and a loopback OpenAI-compatible upstream, as `forward-proxy stats`, `/stats` and `/metrics` report
them per model."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.forward_proxy.stats.table import parse_table
from tests.support.processes import console_script, free_port, wait_for_http
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Received, Reply, Upstream

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
ROUTE = "POST /v1/chat/completions"
WHOLE_MODEL, STREAM_MODEL = "smol-whole", "smol-stream"  # one model per kind of answer: counted apart
WORDS = ["A", " forward", " proxy", " relays", " requests", "."]
GENERATION_SECONDS = 0.2  # how long the upstream "generates" each answer: what every hit saves, at least
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def completion(received: Received) -> bytes:
    """A greedy chat answer of `len(WORDS)` tokens, whole or as Server-Sent Events with `usage` when the
    request asks for it (`stream_options.include_usage`), as OpenAI's API sends them."""
    request = json.loads(received.body)
    usage = {"prompt_tokens": 11, "completion_tokens": len(WORDS), "total_tokens": 11 + len(WORDS)}
    head = {"id": f"chatcmpl-{received.call}", "model": request["model"]}
    if not request.get("stream"):
        message = {"role": "assistant", "content": "".join(WORDS)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return json.dumps({**head, "object": "chat.completion", "choices": [choice], "usage": usage}).encode()
    chunks: list[dict[str, Any]] = [
        {"index": 0, "delta": {"content": word}, "finish_reason": None} for word in WORDS
    ]
    events = [{"choices": [chunk]} for chunk in chunks]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if (request.get("stream_options") or {}).get("include_usage"):
        events.append({"choices": [], "usage": usage})
    lines = [
        b"data: " + json.dumps({**head, "object": "chat.completion.chunk", **e}).encode() for e in events
    ]
    return b"\n\n".join([*lines, b"data: [DONE]"]) + b"\n\n"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream(model_version="smol-1") as server:
        yield server


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[RunningProxy, str]]:
    admin_port = free_port()
    with start_proxy(tmp_path, "--admin-port", str(admin_port)) as running:
        admin = f"http://127.0.0.1:{admin_port}/"
        wait_for_http(admin + "stats", timeout=30)
        yield running, admin


def ask(proxy: RunningProxy, upstream: Upstream, model: str, **fields: Any) -> tuple[str, str | None]:
    """One greedy chat request through the proxy: its X-Cache and X-Cache-Saved-Tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": "What does a forward proxy do?"}]}
    with proxy.session() as session:
        answer = session.post(upstream.url(CHAT), json={**body, "temperature": 0, **fields}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.headers["X-Cache"], answer.headers.get("X-Cache-Saved-Tokens")


def test_the_tokens_and_the_time_saved_are_counted_per_model(
    proxy: tuple[RunningProxy, str], upstream: Upstream
) -> None:
    running, admin = proxy
    upstream.reply(CHAT, Reply(body=completion, delay=GENERATION_SECONDS))
    tokens = str(len(WORDS))
    assert ask(running, upstream, WHOLE_MODEL) == ("MISS", None)
    _wait_stored(running.cache_dir, entries=1)
    assert [ask(running, upstream, WHOLE_MODEL) for _ in range(2)] == [("HIT", tokens), ("HIT", tokens)]
    upstream.reply(CHAT, Reply(body=completion, delay=GENERATION_SECONDS, content_type="text/event-stream"))
    with_usage = {"stream": True, "stream_options": {"include_usage": True}}
    assert ask(running, upstream, STREAM_MODEL, **with_usage) == ("MISS", None)
    _wait_stored(running.cache_dir, entries=2)
    assert ask(running, upstream, STREAM_MODEL, **with_usage) == ("HIT", tokens)
    assert upstream.calls(CHAT) == 2  # one generation per model

    expected = {WHOLE_MODEL: 2 * len(WORDS), STREAM_MODEL: len(WORDS)}
    report = _report_when(running.cache_dir, tokens_saved=3 * len(WORDS))
    served = json.loads(_get(admin + "stats"))
    for seen in (report, served):
        assert seen["completion_tokens_saved"] == 3 * len(WORDS)
        routes = {row["model"]: row for row in seen["routes"] if row["route"] == ROUTE}
        assert {model: row["completion_tokens_saved"] for model, row in routes.items()} == expected
        assert routes[WHOLE_MODEL]["upstream_seconds_saved"] >= 2 * GENERATION_SECONDS  # generation time
        assert routes[STREAM_MODEL]["upstream_seconds_saved"] >= GENERATION_SECONDS
        assert [seen["origins"][0][name] for name in ("hits", "completion_tokens_saved")] == [3, 18]

    metrics = _samples(_get(admin + "metrics").decode())
    origin = upstream.origin
    for model, saved in expected.items():
        labels = (("model", model), ("origin", origin), ("route", ROUTE))
        assert metrics[("forward_proxy_cache_saved_completion_tokens_total", labels)] == saved
        assert metrics[("forward_proxy_cache_saved_upstream_seconds_total", labels)] >= GENERATION_SECONDS

    summary, rows = parse_table(_stats(running.cache_dir))
    assert summary["tokens saved"] == str(3 * len(WORDS))
    assert {row["MODEL"]: row["TOKENS SAVED"] for row in rows} == {m: str(n) for m, n in expected.items()}


def _stats(cache_dir: Path, *args: str) -> str:
    return _forward_proxy("stats", "--cache-dir", str(cache_dir), *args)


def _forward_proxy(*args: str) -> str:
    result = subprocess.run(
        [console_script("forward-proxy"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _wait_stored(cache_dir: Path, entries: int) -> None:
    """Until the store holds `entries` entries: a request that comes while the answer before it is still
    being written is answered from that answer in memory, and these checks are about the stored ones."""
    deadline = time.monotonic() + 30
    while len(json.loads(_forward_proxy("cache", "ls", "--json", "--cache-dir", str(cache_dir)))) < entries:
        assert time.monotonic() < deadline, f"the store did not reach {entries} entries"
        time.sleep(0.05)


def _report_when(cache_dir: Path, tokens_saved: int) -> dict[str, Any]:
    """`stats --json` once the proxy's counts reached the store (it writes them every 0.25 s)."""
    deadline = time.monotonic() + 30
    while True:
        report: dict[str, Any] = json.loads(_stats(cache_dir, "--json"))
        if report["completion_tokens_saved"] >= tokens_saved or time.monotonic() > deadline:
            return report
        time.sleep(0.1)


def _get(url: str) -> bytes:
    with _NO_PROXY.open(url, timeout=10) as response:
        return bytes(response.read())


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
