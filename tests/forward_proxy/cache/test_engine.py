"""The cache engine driven through mitmproxy's taddons, with mitmproxy's forwarding played by a fake
upstream: `send` runs the `request` hook and, when the cache lets the flow through, answers it as the
upstream would and runs the `response` hook, as mitmproxy does. Once on diskcache and once on Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from forward_proxy.cache.addon import Cache
from forward_proxy.cache.record import RECORD, CacheRecord, Decision
from tests.forward_proxy.cache.conftest import CacheBackend

pytestmark = pytest.mark.usefixtures("cache_backend")

ORIGIN = "http://127.0.0.1:8000"
EMBEDDINGS = f"{ORIGIN}/v1/embeddings"


class FakeUpstream:
    """Plays the upstream mitmproxy forwards to: records each request, answers as told."""

    def __init__(self) -> None:
        self.requests: list[http.Request] = []
        self.answer: Callable[[http.Request], http.Response] = self.echo
        self.gate: asyncio.Event | None = None

    @staticmethod
    def echo(request: http.Request) -> http.Response:
        return http.Response.make(
            200,
            json.dumps({"body": request.get_text(), "query": request.query.fields}),
            {"content-type": "application/json", "x-model-version": "v1"},
        )

    def count(self, path: str) -> int:
        return sum(1 for request in self.requests if request.path.split("?")[0] == path)


def embeddings_answer(request: http.Request, tokens_header: bool = False) -> http.Response:
    """An OpenAI-compatible embeddings answer: one vector per input, usage, no X-Input-Tokens."""
    inputs = json.loads(request.content or b"{}")["input"]
    inputs = [inputs] if isinstance(inputs, str) else inputs
    data = [
        {"object": "embedding", "index": i, "embedding": [float(len(text)), 0.5]}
        for i, text in enumerate(inputs)
    ]
    tokens = [len(text.split()) + 2 for text in inputs]
    body = {
        "object": "list",
        "data": data,
        "model": "m",
        "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)},
    }
    headers = {"content-type": "application/json"}
    if tokens_header:
        headers["x-input-tokens"] = ",".join(map(str, tokens))
    return http.Response.make(200, json.dumps(body), headers)


Scenario = Callable[[Cache, FakeUpstream], Awaitable[None]]


def run_scenario(tmp_path: Path, backend: CacheBackend, scenario: Scenario, **options: Any) -> None:
    async def main() -> None:
        cache = Cache()
        with taddons.context(cache) as context:
            context.configure(
                cache, cache_dir=str(tmp_path / "cache"), **backend.options(tmp_path), **options
            )
            cache.running()
            try:
                await scenario(cache, FakeUpstream())
            finally:
                cache.done()

    asyncio.run(main())


def post(url: str = EMBEDDINGS, body: object = None, headers: dict[str, str] | None = None) -> http.HTTPFlow:
    content = json.dumps(body if body is not None else {"input": "hello", "model": "m"}).encode()
    return tflow.tflow(
        req=http.Request.make("POST", url, content, {"content-type": "application/json", **(headers or {})})
    )


async def send(cache: Cache, upstream: FakeUpstream, flow: http.HTTPFlow) -> http.HTTPFlow:
    """What mitmproxy does with a flow: request hook, forward unless answered, response hook."""
    await cache.request(flow)
    if flow.response is None:
        upstream.requests.append(flow.request.copy())
        if upstream.gate is not None:
            await upstream.gate.wait()
        flow.response = upstream.answer(flow.request)
        flow.server_conn.timestamp_start = 1.0
        flow.server_conn.peername = ("127.0.0.1", 8000)
    await cache.response(flow)
    return flow


def record(flow: http.HTTPFlow) -> CacheRecord:
    return flow.metadata[RECORD]


def test_a_repeated_request_is_a_miss_then_a_hit_with_the_same_bytes(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream) -> None:
        first = await send(cache, upstream, post("http://127.0.0.1:8000/v2/models/m/infer"))
        await cache.settled()
        second = await send(cache, upstream, post("http://127.0.0.1:8000/v2/models/m/infer"))
        assert first.response and second.response
        assert (first.response.headers["x-cache"], second.response.headers["x-cache"]) == ("MISS", "HIT")
        assert second.response.content == first.response.content
        assert second.response.reason == "OK"  # the reason phrase, not an empty one
        assert (
            record(second).decision is Decision.HIT
            and record(second).key_id == first.response.headers["x-cache-key"]
        )
        assert upstream.count("/v2/models/m/infer") == 1

    run_scenario(tmp_path, cache_backend, scenario)


def test_private_on_one_of_two_cache_control_lines_is_never_stored(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream) -> None:
        def answer(request: http.Request) -> http.Response:
            response = FakeUpstream.echo(request)
            response.headers.add("cache-control", "private")
            response.headers.add("cache-control", "max-age=600")
            return response

        upstream.answer = answer
        for _ in range(2):
            await send(cache, upstream, post(f"{ORIGIN}/v2/models/m/infer"))
            await cache.settled()
        assert upstream.count("/v2/models/m/infer") == 2

    run_scenario(tmp_path, cache_backend, scenario)


def test_a_waiter_never_gets_an_answer_that_could_not_be_stored(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream) -> None:
        def answer(request: http.Request) -> http.Response:
            response = FakeUpstream.echo(request)
            response.headers["cache-control"] = "private"
            response.headers["x-call"] = str(len(upstream.requests))
            return response

        upstream.answer = answer
        upstream.gate = asyncio.Event()
        flows = [post(f"{ORIGIN}/v2/models/m/infer") for _ in range(3)]
        tasks = [asyncio.ensure_future(send(cache, upstream, flow)) for flow in flows]
        await asyncio.sleep(0.05)
        upstream.gate.set()
        await asyncio.gather(*tasks)
        calls = sorted(flow.response.headers["x-call"] for flow in flows if flow.response)
        assert calls == ["1", "2", "3"]  # each fetched its own private answer

    run_scenario(tmp_path, cache_backend, scenario)


def test_identical_concurrent_requests_share_one_storable_answer(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream) -> None:
        upstream.gate = asyncio.Event()
        flows = [post(f"{ORIGIN}/v2/models/m/infer") for _ in range(4)]
        tasks = [asyncio.ensure_future(send(cache, upstream, flow)) for flow in flows]
        await asyncio.sleep(0.05)
        upstream.gate.set()
        await asyncio.gather(*tasks)
        decisions = sorted(record(flow).decision.value for flow in flows if record(flow).decision)
        assert decisions == ["COALESCED", "COALESCED", "COALESCED", "MISS"]
        assert len({flow.response.content for flow in flows if flow.response}) == 1
        assert upstream.count("/v2/models/m/infer") == 1

    run_scenario(tmp_path, cache_backend, scenario)


def test_a_200_whose_body_is_an_error_is_not_stored(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream) -> None:
        upstream.answer = lambda request: http.Response.make(
            200, b'{"error": {"message": "quota exceeded"}}', {"content-type": "application/json"}
        )
        for _ in range(2):
            flow = await send(cache, upstream, post())
            await cache.settled()
            assert flow.response and flow.response.headers["x-cache"] == "MISS"
        assert upstream.count("/v1/embeddings") == 2

    run_scenario(tmp_path, cache_backend, scenario)


def test_repeated_query_parameters_keep_their_order_in_the_key(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream) -> None:
        first = await send(cache, upstream, post(f"{ORIGIN}/v2/models/m/infer?x=1&x=2"))
        await cache.settled()
        second = await send(cache, upstream, post(f"{ORIGIN}/v2/models/m/infer?x=2&x=1"))
        assert first.response and second.response
        assert second.response.headers["x-cache"] == "MISS"
        assert json.loads(second.response.content)["query"] == [["x", "2"], ["x", "1"]]

    run_scenario(tmp_path, cache_backend, scenario)


def test_rows_without_input_tokens_go_upstream_together_and_are_stored(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream) -> None:
        upstream.answer = embeddings_answer
        batch = {"input": ["one", "two words", "three more words"], "model": "m"}
        first = await send(cache, upstream, post(body=batch))
        await cache.settled()
        second = await send(cache, upstream, post(body=batch))
        await cache.settled()
        mixed = await send(
            cache, upstream, post(body={"input": ["two words", "new text", "one"], "model": "m"})
        )
        assert first.response and second.response and mixed.response
        assert first.response.headers["x-cache-rows"] == "0/3"
        assert (
            second.response.headers["x-cache"] == "HIT" and second.response.headers["x-cache-rows"] == "3/3"
        )
        assert (
            mixed.response.headers["x-cache"] == "PARTIAL" and mixed.response.headers["x-cache-rows"] == "2/3"
        )
        assert len(upstream.requests) == 2  # the first batch, then only the one new text
        assert json.loads(upstream.requests[1].content)["input"] == ["new text"]
        # usage adds up to the upstream's own total for the same texts; the header says it is a share
        assert json.loads(second.response.content)["usage"] == json.loads(first.response.content)["usage"]
        assert second.response.headers["x-cache-usage"] == "estimated"
        vectors = [item["embedding"] for item in json.loads(mixed.response.content)["data"]]
        assert vectors == [[9.0, 0.5], [8.0, 0.5], [3.0, 0.5]]

    run_scenario(tmp_path, cache_backend, scenario)


def test_rows_with_input_tokens_merge_to_exact_usage(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream) -> None:
        upstream.answer = lambda request: embeddings_answer(request, tokens_header=True)
        await send(cache, upstream, post(body={"input": ["a b", "c"], "model": "m"}))
        await cache.settled()
        hit = await send(cache, upstream, post(body={"input": ["c", "a b"], "model": "m"}))
        assert hit.response and hit.response.headers["x-cache-usage"] == "exact"
        assert json.loads(hit.response.content)["usage"]["prompt_tokens"] == 3 + 4

    run_scenario(tmp_path, cache_backend, scenario)


def test_a_hit_on_an_answer_still_being_stored_counts_what_it_saved(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    """A repeat that comes after the answer and before its store write ends is a HIT, and counts the
    upstream time and bytes it saved like any hit."""

    async def scenario(cache: Cache, upstream: FakeUpstream) -> None:
        upstream.gate = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, upstream.gate.set)
        first = await send(cache, upstream, post(f"{ORIGIN}/v2/models/m/infer"))
        second = await send(cache, upstream, post(f"{ORIGIN}/v2/models/m/infer"))  # no wait for the store
        assert first.response and second.response and second.response.headers["x-cache"] == "HIT"
        assert upstream.count("/v2/models/m/infer") == 1
        snapshot = cache.counters.snapshot()
        assert snapshot.total("upstream_seconds_saved") >= 0.04
        assert snapshot.total("bytes_served_from_cache") == len(second.response.content or b"")

    run_scenario(tmp_path, cache_backend, scenario)
