"""Per-item caching in the cache addon, driven through mitmproxy's taddons with a fake model (no sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.test import taddons, tflow

from forward_proxy.cache.addon import Cache
from forward_proxy.cache.upstream import UpstreamError
from tests.forward_proxy.rows.fakes import ModelUpstream, embeddings_answer, inference_answer

ORIGIN = "http://127.0.0.1:8000"
MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The cat sat on the mat.", "Invoices are due in 30 days.", "A third sentence here.", "Fourth one."]

Scenario = Callable[[Cache, ModelUpstream], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, upstream: ModelUpstream | None = None, **options: Any) -> Cache:
    async def main() -> Cache:
        cache = Cache()
        model = upstream or ModelUpstream()
        with taddons.context(cache) as context:
            context.configure(cache, cache_dir=str(tmp_path / "cache"), **options)
            cache.running()
            cache.client = model  # type: ignore[assignment]
            try:
                await asyncio.wait_for(scenario(cache, model), timeout=30)
            finally:
                cache.done()
        return cache

    return asyncio.run(main())


def embed_body(texts: Any, **rest: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": texts, **rest}


async def embed(cache: Cache, texts: Any, headers: dict[str, str] | None = None, **rest: Any) -> Any:
    content = json.dumps(embed_body(texts, **rest)).encode()
    fields = {"content-type": "application/json", **(headers or {})}
    flow = tflow.tflow(req=http.Request.make("POST", f"{ORIGIN}/v1/embeddings", content, fields))
    await cache.request(flow)
    return flow


def direct(texts: Any, version: str = "v1", **rest: Any) -> bytes:
    """What the model answers when asked without the proxy."""
    return embeddings_answer(embed_body(texts, **rest), version)[0]


def cache_headers(flow: Any) -> tuple[str, str | None]:
    return flow.response.headers["x-cache"], flow.response.headers.get("x-cache-rows")


def counts(cache: Cache, *names: str) -> dict[str, float]:
    snapshot = cache.counters.snapshot()
    return {name: snapshot.total(name) for name in names}


def test_new_known_and_mixed_batches_answer_what_the_model_answers(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        new = await embed(cache, TEXTS[:2])
        assert cache_headers(new) == ("MISS", "0/2")
        assert new.response.content == direct(TEXTS[:2])
        known = await embed(cache, TEXTS[:2])
        assert cache_headers(known) == ("HIT", "2/2")
        assert known.response.content == direct(TEXTS[:2])
        assert known.response.headers["x-model-version"] == "v1" and "age" in known.response.headers
        mixed = await embed(cache, [TEXTS[2], TEXTS[0], TEXTS[3], TEXTS[1]])
        assert cache_headers(mixed) == ("PARTIAL", "2/4")
        assert mixed.response.content == direct([TEXTS[2], TEXTS[0], TEXTS[3], TEXTS[1]])
        assert model.rows_computed() == [*TEXTS[:2], TEXTS[2], TEXTS[3]]  # only unknown rows, in order
        assert model.inference_calls()[0] == embed_body(TEXTS[:2])  # an all-new batch goes as it came
        assert mixed.metadata["fp.cache"] == "PARTIAL"
        assert mixed.metadata["fp.rows"] == {"rows": 4, "from_cache": 2, "upstream": 2}
        assert counts(cache, "requests", "hits", "misses", "partials") == {
            "requests": 3,
            "hits": 1,
            "misses": 1,  # each request counts one decision: the PARTIAL one is in `partials` alone
            "partials": 1,
        }
        assert counts(cache, "rows", "rows_from_cache", "rows_upstream", "stores") == {
            "rows": 8,
            "rows_from_cache": 4,
            "rows_upstream": 4,
            "stores": 4,
        }

    run(tmp_path, scenario)


def test_a_row_repeated_inside_a_batch_is_computed_once(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        batch = [TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[0]]
        flow = await embed(cache, batch)
        assert flow.response.content == direct(batch)
        assert json.loads(flow.response.content)["usage"]["prompt_tokens"] == 8 + 8 + 8 + 8
        assert model.rows_computed() == TEXTS[:2]

    run(tmp_path, scenario)


def test_without_per_input_token_counts_texts_go_one_per_request_and_are_all_stored(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        first = await embed(cache, TEXTS[:3])  # the proxy learns that this upstream sends no counts
        assert first.response.content == direct(TEXTS[:3])
        second = await embed(cache, TEXTS[:3])
        assert cache_headers(second) == ("MISS", "0/3") and second.response.content == first.response.content
        assert [body["input"] for body in model.inference_calls()] == [
            TEXTS[:3],
            *([text] for text in TEXTS[:3]),
        ]
        third = await embed(cache, TEXTS[:3])
        assert cache_headers(third) == ("HIT", "3/3") and third.response.content == first.response.content

    run(tmp_path, scenario, ModelUpstream(report_tokens=False))


def test_token_id_rows_are_counted_from_the_ids(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, [[101, 7592, 102], [101, 2088, 2003, 102]])
        mixed = await embed(cache, [[101, 2088, 2003, 102], [101, 102]])
        assert cache_headers(mixed) == ("PARTIAL", "1/2")
        assert mixed.response.content == direct([[101, 2088, 2003, 102], [101, 102]])
        assert len(model.inference_calls()) == 2

    run(tmp_path, scenario, ModelUpstream(report_tokens=False))


def test_concurrent_batches_compute_shared_rows_once(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        model.gate = asyncio.Event()
        first = asyncio.create_task(embed(cache, TEXTS[:3]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(embed(cache, TEXTS[1:]))
        await asyncio.sleep(0.05)
        model.gate.set()
        one, two = await first, await second
        assert one.response.content == direct(TEXTS[:3]) and two.response.content == direct(TEXTS[1:])
        assert sorted(model.rows_computed()) == sorted(TEXTS)  # rows 1 and 2 once, for both batches
        assert cache_headers(two) == ("MISS", "0/3")
        assert two.metadata["fp.rows"] == {"rows": 3, "from_cache": 0, "upstream": 1}

    run(tmp_path, scenario)


def test_rows_stored_while_a_batch_looked_them_up_are_not_computed_again(tmp_path: Path) -> None:
    """The batch's lookup reads before another batch stores a shared row and returns after it published."""

    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        assert cache.store is not None
        store, read = cache.store, cache.store.get
        release, slow = threading.Event(), threading.Event()

        def get(key: str) -> Any:
            entry = read(key)
            if slow.is_set() and threading.current_thread() is not threading.main_thread():
                release.wait(10)  # a row lookup (off the event loop) that read the store too early
            return entry

        store.get = get  # type: ignore[method-assign]
        model.gate = asyncio.Event()
        first = asyncio.create_task(embed(cache, TEXTS[:2]))
        await asyncio.sleep(0.05)  # the first batch is upstream
        slow.set()
        second = asyncio.create_task(embed(cache, TEXTS[1:3]))
        await asyncio.sleep(0.05)  # its lookup has read: nothing stored yet
        model.gate.set()
        await first  # stored and published
        release.set()
        two = await second
        assert two.response.content == direct(TEXTS[1:3])
        assert model.rows_computed() == TEXTS[:3]  # TEXTS[1] once
        assert cache_headers(two) == ("PARTIAL", "1/2")

    run(tmp_path, scenario)


def test_identical_concurrent_batches_share_one_answer(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        model.gate = asyncio.Event()
        tasks = [asyncio.create_task(embed(cache, TEXTS[:2])) for _ in range(3)]
        await asyncio.sleep(0.05)
        model.gate.set()
        flows = await asyncio.gather(*tasks)
        assert [flow.response.headers["x-cache"] for flow in flows] == ["MISS", "COALESCED", "COALESCED"]
        assert all(flow.response.content == direct(TEXTS[:2]) for flow in flows)
        assert len(model.inference_calls()) == 1

    run(tmp_path, scenario)


def test_identical_concurrent_batches_of_known_rows_are_all_hits(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:2])
        await cache.settled()
        flows = await asyncio.gather(*(embed(cache, TEXTS[:2]) for _ in range(4)))
        assert [cache_headers(flow) for flow in flows] == [("HIT", "2/2")] * 4  # none waited on a model
        assert all(flow.response.content == direct(TEXTS[:2]) for flow in flows)
        assert len(model.inference_calls()) == 1
        assert counts(cache, "hits", "coalesced", "rows_from_cache") == {
            "hits": 4,
            "coalesced": 0,
            "rows_from_cache": 8,
        }

    run(tmp_path, scenario)


def test_no_cache_recomputes_every_row_and_stores_it(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:2])
        refreshed = await embed(cache, TEXTS[:3], {"cache-control": "no-cache"})
        assert cache_headers(refreshed) == ("REFRESH", "0/3")
        assert model.rows_computed() == [*TEXTS[:2], *TEXTS[:3]]
        hit = await embed(cache, TEXTS[:3])
        assert cache_headers(hit) == ("HIT", "3/3")

    run(tmp_path, scenario)


def test_max_age_applies_to_each_row(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:1])
        assert cache.store is not None
        for key, entry in list(cache.store.iter_entries()):
            cache.store.set(key, dataclasses.replace(entry, stored_at=entry.stored_at - 60), 3600)
        await embed(cache, TEXTS[1:2])  # young
        flow = await embed(cache, TEXTS[:2], {"cache-control": "max-age=30"})
        assert cache_headers(flow) == ("PARTIAL", "1/2")
        assert model.rows_computed()[-1] == TEXTS[0]  # the old row was computed again
        assert flow.response.content == direct(TEXTS[:2])
        old_ok = await embed(cache, TEXTS[:2], {"cache-control": "max-age=300"})
        assert cache_headers(old_ok) == ("HIT", "2/2")

    run(tmp_path, scenario)


def test_only_if_cached_needs_every_row(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:2])
        calls = len(model.calls)
        partial = await embed(cache, TEXTS[:3], {"cache-control": "only-if-cached"})
        assert partial.response.status_code == 504
        error = json.loads(partial.response.content)["error"]
        assert error["code"] == "not_cached" and "1 of the 3 rows" in error["message"]
        cached = await embed(cache, TEXTS[:2], {"cache-control": "only-if-cached"})
        assert cache_headers(cached) == ("HIT", "2/2")
        assert len(model.calls) == calls

    run(tmp_path, scenario)


def test_no_store_sends_the_batch_whole_and_keeps_nothing(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:1])
        flow = await embed(cache, TEXTS[:2], {"cache-control": "no-store"})
        assert flow.response.headers["x-cache"] == "BYPASS" and "x-cache-rows" not in flow.response.headers
        assert model.inference_calls()[-1] == embed_body(TEXTS[:2])
        assert cache_headers(await embed(cache, TEXTS[1:2])) == ("MISS", "0/1")

    run(tmp_path, scenario)


def test_rows_are_not_shared_across_credentials(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:2], {"authorization": "Bearer team-a"})
        other = await embed(cache, TEXTS[:2], {"authorization": "Bearer team-b"})
        same = await embed(cache, TEXTS[:2], {"authorization": "Bearer team-a"})
        assert cache_headers(other) == ("MISS", "0/2")
        assert cache_headers(same) == ("HIT", "2/2")
        assert model.inference_calls()[-1] == embed_body(TEXTS[:2])
        assert model.calls[-1][2]["authorization"] == "Bearer team-b"  # credentials go upstream as sent

    run(tmp_path, scenario)


def test_the_rest_of_the_body_is_part_of_each_row(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:2])
        other = await embed(cache, TEXTS[:2], dimensions=4)
        assert cache_headers(other) == ("MISS", "0/2")
        assert other.response.content == direct(TEXTS[:2], dimensions=4)

    run(tmp_path, scenario)


def test_rows_of_an_older_model_version_are_never_mixed_in(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:2])
        model.version = "v2"
        mixed = await embed(cache, [TEXTS[0], TEXTS[2]])
        # The missing row came back from v2: the whole batch is asked again rather than mixing versions.
        assert mixed.response.content == direct([TEXTS[0], TEXTS[2]], version="v2")
        assert mixed.response.headers["x-cache"] == "MISS"
        again = await embed(cache, TEXTS[:2])
        assert again.response.content == direct(TEXTS[:2], version="v2")
        assert cache_headers(await embed(cache, TEXTS[:2])) == ("HIT", "2/2")

    run(tmp_path, scenario, version_check_interval="0")


def test_a_refused_smaller_batch_is_asked_whole_so_errors_name_the_clients_positions(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:1])
        flow = await embed(cache, [TEXTS[0], "bad"])
        assert flow.response.status_code == 400
        assert json.loads(flow.response.content)["error"]["message"] == "'input[1]' is bad"
        assert [body["input"] for body in model.inference_calls()[1:]] == [["bad"], [TEXTS[0], "bad"]]

    run(tmp_path, scenario)


def test_stale_rows_stand_in_when_the_upstream_fails(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:2])
        assert cache.store is not None
        for key, entry in list(cache.store.iter_entries()):
            cache.store.set(key, dataclasses.replace(entry, stored_at=entry.stored_at - 120), 3600)
        model.failure = UpstreamError("unreachable", "connection refused")
        stale = await embed(cache, TEXTS[:2])
        assert cache_headers(stale) == ("STALE", "2/2") and stale.response.content == direct(TEXTS[:2])
        failed = await embed(cache, TEXTS[1:3])
        assert failed.response.status_code == 502
        assert json.loads(failed.response.content)["error"]["code"] == "upstream_unreachable"

    run(tmp_path, scenario, cache_ttl="60s")


def test_per_item_cache_off_caches_batches_whole(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await embed(cache, TEXTS[:2])
        await cache.settled()
        flow = await embed(cache, TEXTS[:3])
        assert flow.response.headers["x-cache"] == "MISS" and "x-cache-rows" not in flow.response.headers
        assert model.inference_calls()[-1] == embed_body(TEXTS[:3])
        await cache.settled()
        assert (await embed(cache, TEXTS[:3])).response.headers["x-cache"] == "HIT"

    run(tmp_path, scenario, per_item_cache=False)


def infer_body(rows: list[list[float]], **rest: Any) -> dict[str, Any]:
    shape = [len(rows), len(rows[0])]
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": shape, "data": rows}], **rest}


async def infer(cache: Cache, rows: list[list[float]], **rest: Any) -> Any:
    content = json.dumps(infer_body(rows, **rest)).encode()
    url = f"{ORIGIN}/v2/models/scorer/infer"
    flow = tflow.tflow(req=http.Request.make("POST", url, content, {"content-type": "application/json"}))
    await cache.request(flow)
    return flow


def test_kserve_rows_of_a_batching_model(tmp_path: Path) -> None:
    rows = [[0.5, 1.0], [2.0, -1.0], [3.0, 3.0]]

    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await infer(cache, rows[:2], id="first")
        mixed = await infer(cache, [rows[2], rows[0], rows[2]], id="second")
        assert cache_headers(mixed) == ("PARTIAL", "1/3")
        expected = inference_answer(infer_body([rows[2], rows[0], rows[2]], id="second"), version="v1")
        assert mixed.response.content == expected
        assert model.rows_computed() == [rows[0], rows[1], rows[2]]
        hit = await infer(cache, rows[1:])
        assert cache_headers(hit) == ("HIT", "2/2")
        assert hit.response.content == inference_answer(infer_body(rows[1:]), version="v1")
        assert [path for method, path, _, _ in model.calls if method == "GET"].count("/v2/models/scorer") == 1

    run(tmp_path, scenario)


def test_kserve_models_that_do_not_batch_are_cached_whole(tmp_path: Path) -> None:
    async def scenario(cache: Cache, model: ModelUpstream) -> None:
        await infer(cache, [[1.0, 2.0]])
        flow = await infer(cache, [[1.0, 2.0], [3.0, 4.0]])
        assert flow.response.headers["x-cache"] == "MISS" and "x-cache-rows" not in flow.response.headers

    run(tmp_path, scenario, ModelUpstream(max_batch_size=0))
