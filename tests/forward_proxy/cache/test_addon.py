"""The cache addon driven through mitmproxy's taddons with a fake upstream client (no upstream sockets),
once on diskcache and once on a real Redis (`conftest.py`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow

from forward_proxy.cache.addon import Cache
from forward_proxy.cache.upstream import UpstreamError, UpstreamResponse
from forward_proxy.store.base import Entry, StoreError
from tests.forward_proxy.cache.conftest import CacheBackend

pytestmark = pytest.mark.usefixtures("cache_backend")

ORIGIN = "http://127.0.0.1:8000"
EMBEDDINGS = f"{ORIGIN}/v1/embeddings"


class FakeUpstream:
    """Stands in for UpstreamClient: counts calls per path and answers as told."""

    def __init__(self) -> None:
        self.version: str | None = "v1"
        self.calls: list[tuple[str, str, list[tuple[bytes, bytes]], bytes]] = []
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        self.failure: UpstreamError | None = None
        self.gate: asyncio.Event | None = None
        self.verify_tls = True

    def count(self, path: str) -> int:
        return sum(1 for _, target, _, _ in self.calls if target.split("?")[0] == path)

    async def request(
        self,
        scheme: str,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
        server_name: str | None = None,
    ) -> UpstreamResponse:
        self.calls.append((method, target, list(headers), body))
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        fields = list(self.headers)
        if self.version is not None:
            fields.append((b"x-model-version", self.version.encode()))
        content = json.dumps({"call": len(self.calls), "target": target}).encode()
        return UpstreamResponse(self.status, b"OK", tuple(fields), content, 0.125)

    def close(self) -> None:
        pass


def embeddings_flow(body: object = None, headers: dict[str, str] | None = None, url: str = EMBEDDINGS) -> Any:
    content = json.dumps(body if body is not None else {"input": "hello", "model": "minilm"}).encode()
    fields = {"content-type": "application/json", **(headers or {})}
    return tflow.tflow(req=http.Request.make("POST", url, content, fields))


Scenario = Callable[[Cache, FakeUpstream, taddons.context], Awaitable[None]]


def run_scenario(tmp_path: Path, backend: CacheBackend, scenario: Scenario, **options: Any) -> Cache:
    """Run `scenario` with a configured, running Cache on `backend` whose upstream is a FakeUpstream."""

    async def main() -> Cache:
        cache = Cache()
        upstream = FakeUpstream()
        with taddons.context(cache) as context:
            context.configure(
                cache, cache_dir=str(tmp_path / "cache"), **backend.options(tmp_path), **options
            )
            cache.running()
            assert cache.backend is not None and cache.backend.kind == backend.name
            cache.client = upstream  # type: ignore[assignment]
            try:
                await scenario(cache, upstream, context)
            finally:
                cache.done()
        return cache

    return asyncio.run(main())


async def let_tasks_run() -> None:
    """Let every ready task run until it blocks (no I/O is involved, so a bounded number of turns)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def send(cache: Cache, flow: Any) -> Any:
    await cache.request(flow)
    return flow


def totals(cache: Cache) -> dict[str, float]:
    snapshot = cache.counters.snapshot()
    return {name: snapshot.total(name) for name in ("requests", "hits", "misses", "stores", "store_errors")}


def test_a_repeated_request_is_a_miss_then_a_hit(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        first = await send(cache, embeddings_flow())
        await cache.settled()  # the store write runs after the answer
        second = await send(cache, embeddings_flow())
        assert first.response.headers["x-cache"] == "MISS"
        assert second.response.headers["x-cache"] == "HIT"
        assert second.response.content == first.response.content
        assert second.response.headers["age"] == "0"
        assert second.response.headers["x-cache-key"] == first.response.headers["x-cache-key"]
        assert second.response.headers["x-model-version"] == "v1"
        assert upstream.count("/v1/embeddings") == 1
        assert second.metadata == {
            "fp.route": "POST /v1/embeddings",
            "fp.origin": ORIGIN,
            "fp.key_id": first.response.headers["x-cache-key"],
            "fp.cache": "HIT",
            "fp.model": "minilm",
            "fp.upstream_seconds": 0.125,
        }
        assert totals(cache) == {"requests": 2, "hits": 1, "misses": 1, "stores": 1, "store_errors": 0}
        assert cache.counters.snapshot().total("upstream_seconds_saved") == pytest.approx(0.125)

    run_scenario(tmp_path, cache_backend, scenario)


def test_requests_no_rule_matches_are_left_alone(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        flow = await send(cache, tflow.tflow(req=http.Request.make("GET", f"{ORIGIN}/v1/models")))
        assert flow.response is None and flow.metadata == {}
        assert upstream.calls == []

    run_scenario(tmp_path, cache_backend, scenario)


def test_the_first_request_to_an_origin_checks_its_version(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        await send(cache, embeddings_flow())
        assert [target for _, target, _, _ in upstream.calls] == ["/v2/health/live", "/v1/embeddings"]
        assert cache.versions.current(ORIGIN) == "v1"

    run_scenario(tmp_path, cache_backend, scenario)


def test_only_if_cached_answers_504_on_a_miss_without_asking_upstream(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        flow = await send(cache, embeddings_flow(headers={"cache-control": "only-if-cached"}))
        assert flow.response.status_code == 504
        assert flow.response.headers["content-type"] == "application/json"
        assert json.loads(flow.response.content)["error"]["code"] == "not_cached"
        assert upstream.calls == []

    run_scenario(tmp_path, cache_backend, scenario)


def test_no_store_bypasses_reading_and_writing(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        await send(cache, embeddings_flow())
        await cache.settled()
        bypass = await send(
            cache, embeddings_flow(body={"input": "new"}, headers={"cache-control": "no-store"})
        )
        await cache.settled()
        again = await send(cache, embeddings_flow(body={"input": "new"}))
        assert bypass.response.headers["x-cache"] == "BYPASS"
        assert again.response.headers["x-cache"] == "MISS"
        cached = await send(cache, embeddings_flow(headers={"cache-control": "no-store"}))
        assert cached.response.headers["x-cache"] == "BYPASS"  # not read either
        assert upstream.count("/v1/embeddings") == 4

    run_scenario(tmp_path, cache_backend, scenario)


def test_no_cache_refreshes_the_entry(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        await send(cache, embeddings_flow())
        await cache.settled()
        refreshed = await send(cache, embeddings_flow(headers={"cache-control": "no-cache"}))
        await cache.settled()
        hit = await send(cache, embeddings_flow())
        assert refreshed.response.headers["x-cache"] == "REFRESH"
        assert hit.response.headers["x-cache"] == "HIT"
        assert hit.response.content == refreshed.response.content
        assert upstream.count("/v1/embeddings") == 2

    run_scenario(tmp_path, cache_backend, scenario)


async def age_all_entries(cache: Cache, seconds: float) -> None:
    assert cache.store is not None
    for key, entry in list(cache.store.iter_entries()):
        cache.store.set(key, dataclasses.replace(entry, stored_at=entry.stored_at - seconds), 3600)


def test_max_age_rejects_older_entries(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        await send(cache, embeddings_flow())
        await cache.settled()
        await age_all_entries(cache, 20)
        young_enough = await send(cache, embeddings_flow(headers={"cache-control": "max-age=30"}))
        too_old = await send(cache, embeddings_flow(headers={"cache-control": "max-age=10"}))
        assert young_enough.response.headers["x-cache"] == "HIT"
        assert int(young_enough.response.headers["age"]) >= 20
        assert too_old.response.headers["x-cache"] == "MISS"

    run_scenario(tmp_path, cache_backend, scenario)


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (
            UpstreamError("unreachable", "cannot connect to 127.0.0.1:8000 (refused)"),
            502,
            "upstream_unreachable",
        ),
        (UpstreamError("timeout", "no complete answer within 1s"), 504, "upstream_timeout"),
        (UpstreamError("protocol", "the connection broke"), 502, "upstream_failed"),
    ],
)
def test_upstream_failures_answer_json_errors_and_are_not_cached(
    tmp_path: Path, cache_backend: CacheBackend, failure: UpstreamError, status: int, code: str
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        cache.versions.learn(ORIGIN, "v1", now=__import__("time").time())
        upstream.failure = failure
        flow = await send(cache, embeddings_flow())
        body = json.loads(flow.response.content)["error"]
        assert flow.response.status_code == status
        assert body["code"] == code and body["upstream"] == ORIGIN and ORIGIN in body["message"]
        assert body["cause"] == failure.message
        upstream.failure = None
        await cache.settled()
        assert (await send(cache, embeddings_flow())).response.headers["x-cache"] == "MISS"
        assert cache.counters.snapshot().total("upstream_errors") == 1

    run_scenario(tmp_path, cache_backend, scenario)


def test_5xx_answers_are_passed_on_and_not_cached(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        upstream.status = 503
        first = await send(cache, embeddings_flow())
        await cache.settled()
        second = await send(cache, embeddings_flow())
        assert first.response.status_code == second.response.status_code == 503
        assert second.response.headers["x-cache"] == "MISS"
        assert cache.store is not None and list(cache.store.iter_entries()) == []

    run_scenario(tmp_path, cache_backend, scenario)


def fail_unreachable(upstream: FakeUpstream) -> None:
    upstream.failure = UpstreamError("unreachable", "refused")


def fail_with_503_json(upstream: FakeUpstream) -> None:
    upstream.status = 503  # a JSON body: the model API's own error, passed on when nothing stands in


def fail_by_timeout(upstream: FakeUpstream) -> None:
    upstream.failure = UpstreamError("timeout", "no complete answer within 1s")


@pytest.mark.parametrize("per_item_cache", [True, False], ids=["rows", "whole"])
@pytest.mark.parametrize(
    ("fail", "status_after_the_window"),
    [(fail_unreachable, 502), (fail_with_503_json, 503), (fail_by_timeout, 504)],
    ids=["unreachable", "503 JSON", "timeout"],
)
def test_stale_if_error_serves_an_expired_entry_when_the_upstream_fails(
    tmp_path: Path,
    cache_backend: CacheBackend,
    fail: Callable[[FakeUpstream], None],
    status_after_the_window: int,
    per_item_cache: bool,
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        first = await send(cache, embeddings_flow())
        await cache.settled()
        await age_all_entries(cache, 90)  # past the 60 s TTL, within 60 s + 5 min
        fail(upstream)
        calls = upstream.count("/v1/embeddings")
        stale = await send(cache, embeddings_flow())
        assert upstream.count("/v1/embeddings") == calls + 1  # the upstream was asked first
        assert stale.response.status_code == 200
        assert stale.response.headers["x-cache"] == "STALE"
        assert stale.response.content == first.response.content
        assert int(stale.response.headers["age"]) >= 90
        assert cache.counters.snapshot().total("stale") == 1
        await age_all_entries(cache, 400)  # now past the stale-if-error window too
        late = await send(cache, embeddings_flow())
        assert late.response.status_code == status_after_the_window
        assert late.response.headers["x-cache"] == "MISS"

    run_scenario(
        tmp_path, cache_backend, scenario, cache_ttl="60s", stale_if_error="5m", per_item_cache=per_item_cache
    )


def test_an_entry_of_another_version_is_never_served(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        first = await send(cache, embeddings_flow())
        await cache.settled()
        upstream.version = "v2"
        cache.versions.learn(ORIGIN, "v2", now=__import__("time").time())  # e.g. from another response
        second = await send(cache, embeddings_flow())
        assert second.response.headers["x-cache"] == "MISS"
        assert second.response.headers["x-model-version"] == "v2"
        assert second.response.headers["x-cache-key"] != first.response.headers["x-cache-key"]
        upstream.failure = UpstreamError("unreachable", "refused")
        await cache.settled()
        assert cache.store is not None
        versions = sorted(entry.model_version or "" for _, entry in cache.store.iter_entries())
        assert versions == ["v1", "v2"]

    run_scenario(tmp_path, cache_backend, scenario)


def test_an_expired_version_is_rechecked_before_a_hit(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        await send(cache, embeddings_flow())
        await cache.settled()
        upstream.version = "v2"  # redeployed; the proxy has not seen a response since
        await asyncio.sleep(0.25)  # the version knowledge (interval 0.2 s) has expired
        after = await send(cache, embeddings_flow())
        assert after.response.headers["x-cache"] == "MISS"
        assert after.response.headers["x-model-version"] == "v2"
        assert upstream.count("/v2/health/live") == 2

    run_scenario(tmp_path, cache_backend, scenario, version_check_interval="200ms")


def test_a_failing_store_never_fails_a_request(tmp_path: Path, cache_backend: CacheBackend) -> None:
    class BrokenStore:
        def get(self, key: str) -> Entry | None:
            raise StoreError("disk I/O error")

        def set(self, key: str, entry: Entry, expire_seconds: float) -> int:
            raise StoreError("attempt to write a readonly database")

        def close(self) -> None:
            pass

    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        cache.store = BrokenStore()  # type: ignore[assignment]
        flows = [await send(cache, embeddings_flow())]
        await cache.settled()
        flows.append(await send(cache, embeddings_flow()))
        await cache.settled()
        assert [flow.response.status_code for flow in flows] == [200, 200]
        assert [flow.response.headers["x-cache"] for flow in flows] == ["MISS", "MISS"]
        assert totals(cache)["store_errors"] == 4  # two failed reads, two failed writes

    run_scenario(tmp_path, cache_backend, scenario)


@pytest.mark.disk_only
def test_an_unusable_cache_directory_forwards_uncached(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")

    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        assert cache.store is None
        flow = await send(cache, embeddings_flow())
        assert flow.response.status_code == 200 and flow.response.headers["x-cache"] == "MISS"
        assert totals(cache)["store_errors"] == 1

    async def main() -> None:
        cache = Cache()
        upstream = FakeUpstream()
        with taddons.context(cache) as context:
            context.configure(cache, cache_dir=str(tmp_path / "file" / "cache"))
            cache.running()
            cache.client = upstream  # type: ignore[assignment]
            await scenario(cache, upstream, context)
            cache.done()

    asyncio.run(main())


def test_identical_requests_in_flight_share_one_upstream_call(
    tmp_path: Path, cache_backend: CacheBackend
) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        cache.versions.learn(ORIGIN, "v1", now=__import__("time").time())
        upstream.gate = asyncio.Event()
        flows = [embeddings_flow() for _ in range(8)]
        tasks = [asyncio.ensure_future(send(cache, flow)) for flow in flows]
        await let_tasks_run()
        upstream.gate.set()
        await asyncio.gather(*tasks)
        assert upstream.count("/v1/embeddings") == 1
        decisions = sorted(flow.response.headers["x-cache"] for flow in flows)
        assert decisions == ["COALESCED"] * 7 + ["MISS"]
        assert len({flow.response.content for flow in flows}) == 1

    run_scenario(tmp_path, cache_backend, scenario)


def test_a_failing_shared_call_fails_every_waiter(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        cache.versions.learn(ORIGIN, "v1", now=__import__("time").time())
        upstream.gate = asyncio.Event()
        upstream.failure = UpstreamError("unreachable", "refused")
        flows = [embeddings_flow() for _ in range(5)]
        tasks = [asyncio.ensure_future(send(cache, flow)) for flow in flows]
        await let_tasks_run()
        upstream.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert [flow.response.status_code for flow in flows] == [502] * 5
        assert upstream.count("/v1/embeddings") == 1

    run_scenario(tmp_path, cache_backend, scenario)


def test_credentials_and_namespaces_partition_entries(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        variants = [
            {},
            {"authorization": "Bearer tenant-a"},
            {"authorization": "Bearer tenant-b"},
            {"x-api-key": "k"},
            {"x-cache-namespace": "experiment"},
        ]
        keys = set()
        for headers in variants:
            flow = await send(cache, embeddings_flow(headers=headers))
            assert flow.response.headers["x-cache"] == "MISS"
            keys.add(flow.response.headers["x-cache-key"])
            await cache.settled()
        assert len(keys) == len(variants)
        sent = [dict((k.decode(), v.decode()) for k, v in headers) for _, _, headers, _ in upstream.calls]
        assert all("x-cache-namespace" not in headers for headers in sent)

    run_scenario(tmp_path, cache_backend, scenario)


def test_ignored_fields_share_an_entry(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        await send(cache, embeddings_flow(body={"input": "hi", "request_id": "1"}))
        await cache.settled()
        flow = await send(cache, embeddings_flow(body={"request_id": "2", "input": "hi"}))
        assert flow.response.headers["x-cache"] == "HIT"

    run_scenario(tmp_path, cache_backend, scenario, cache_ignore_fields=["request_id"])


def test_streaming_requests_are_bypassed_to_mitmproxy(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        flow = await send(cache, embeddings_flow(body={"input": "hi", "stream": True}))
        assert flow.response is None and flow.metadata["fp.cache"] == "BYPASS"
        assert upstream.calls == []

    run_scenario(tmp_path, cache_backend, scenario)


def test_unstorable_answers_are_not_stored(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        upstream.headers.append((b"set-cookie", b"session=1"))
        await send(cache, embeddings_flow())
        await cache.settled()
        assert (await send(cache, embeddings_flow())).response.headers["x-cache"] == "MISS"

    run_scenario(tmp_path, cache_backend, scenario)


def test_forwarded_responses_teach_the_version(tmp_path: Path, cache_backend: CacheBackend) -> None:
    async def scenario(cache: Cache, upstream: FakeUpstream, _: Any) -> None:
        flow = tflow.tflow(req=http.Request.make("GET", f"{ORIGIN}/v1/models"), resp=True)
        flow.response.headers["x-model-version"] = "v7"
        cache.response(flow)
        assert cache.versions.current(ORIGIN) == "v7"

    run_scenario(tmp_path, cache_backend, scenario)


def test_bad_options_are_refused_with_the_option_name(tmp_path: Path) -> None:
    cache = Cache()
    with taddons.context(cache) as context, pytest.raises(exceptions.OptionsError, match="cache_size"):
        context.configure(cache, cache_size="big")
