"""A fleet: two real `forward-proxy run` processes, A and B, on one real redis-server
(`--cache-backend redis://...`), in front of a recording upstream.

They share entries (a miss through A is a hit through B), counters (both add up), one upstream call for
identical requests in flight on either, and purges (with a memory tier in each, which must not serve a
purged entry). Redis stopped mid-run fails no client request; once it is back, caching resumes without a
restart. The Redis outage test runs last: it empties Redis.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.forward_proxy.redis.running import embed, fresh_session, wait_until
from tests.support.processes import console_script
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.redis_server import RedisServer, redis_available
from tests.support.upstream import Reply, Upstream

pytestmark = [pytest.mark.integration, pytest.mark.redis]

MEMORY_TIER = ("--set", "cache_memory_tier=1MiB", "--set", "cache_memory_ttl=60s")


@dataclass
class Fleet:
    redis: RedisServer
    upstream: Upstream
    a: RunningProxy
    b: RunningProxy
    proxies: list[RunningProxy] = field(init=False)

    def __post_init__(self) -> None:
        self.proxies = [self.a, self.b]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [console_script("forward-proxy"), *args, "--cache-backend", self.redis.url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stats(self) -> dict[str, Any]:
        result = self.cli("stats", "--json")
        assert result.returncode == 0, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not redis_available():
        pytest.skip("redis-server is not installed (scripts/install-system.sh installs it)")
    directory = tmp_path_factory.mktemp("fleet")
    with RedisServer(directory) as redis, Upstream(model_version="v1") as upstream:
        backend = ("--cache-backend", redis.url, *MEMORY_TIER)
        # Each proxy has a cache directory of its own: only Redis is shared.
        with (
            start_proxy(directory / "a", *backend) as a,
            start_proxy(directory / "b", *backend) as b,
        ):
            yield Fleet(redis, upstream, a, b)


def test_an_answer_cached_through_a_is_a_hit_through_b(fleet: Fleet) -> None:
    url = fleet.upstream.url("/v1/embeddings")
    before = fleet.upstream.calls("/v1/embeddings")
    with fresh_session() as session:
        miss = embed(session, fleet.a, url, "shared by the fleet")
        hit = embed(session, fleet.b, url, "shared by the fleet")
    assert (miss.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
    assert hit.content == miss.content and hit.headers["X-Cache-Key"] == miss.headers["X-Cache-Key"]
    assert fleet.upstream.calls("/v1/embeddings") == before + 1


def test_each_proxy_warns_at_start_that_redis_has_no_memory_bound(fleet: Fleet) -> None:
    for proxy in fleet.proxies:  # the test server runs without maxmemory
        assert "has no maxmemory" in proxy.log() and "maxmemory-policy volatile-lru" in proxy.log()


def test_the_counters_of_both_proxies_add_up(fleet: Fleet) -> None:
    time.sleep(0.6)  # the counts of earlier tests reach Redis within a flush interval (0.25 s)
    before = fleet.stats()
    url = fleet.upstream.url("/v1/embeddings")
    with fresh_session() as session:
        for index in range(3):
            embed(session, fleet.a, url, f"counted {index}")  # 3 misses through A
        for index in range(3):
            embed(session, fleet.b, url, f"counted {index}")  # 3 hits through B
        embed(session, fleet.b, url, "counted by b")  # 1 miss through B
    wait_until(lambda: fleet.stats()["requests"] == before["requests"] + 7, 10, lambda: str(fleet.stats()))
    after = fleet.stats()
    assert after["hits"] - before["hits"] == 3
    assert after["misses"] - before["misses"] == 4
    assert after["stores"] - before["stores"] == 4


def test_32_concurrent_identical_requests_across_a_and_b_make_one_upstream_call(fleet: Fleet) -> None:
    path = "/v1/embeddings"
    fleet.upstream.reply(path, Reply(delay=0.5))  # long enough for all 32 to arrive meanwhile
    url = fleet.upstream.url(path)
    before = fleet.upstream.calls(path)

    def ask(index: int) -> requests.Response:
        with fresh_session() as session:
            return embed(session, fleet.proxies[index % 2], url, "thirty-two at once")

    try:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, range(32)))
    finally:
        fleet.upstream.reply(path, Reply())
    assert [answer.status_code for answer in answers] == [200] * 32
    assert fleet.upstream.calls(path) == before + 1
    assert len({answer.content for answer in answers}) == 1
    decisions = sorted(answer.headers["X-Cache"] for answer in answers)
    assert decisions.count("MISS") == 1, decisions


def test_a_purge_through_one_proxy_reaches_the_other(fleet: Fleet) -> None:
    url = fleet.upstream.url("/v1/embeddings")
    with fresh_session() as session:
        first = embed(session, fleet.a, url, "to be purged")
        assert embed(session, fleet.b, url, "to be purged").headers["X-Cache"] == "HIT"  # now in B's tier
        assert embed(session, fleet.a, url, "to be purged").headers["X-Cache"] == "HIT"  # and in A's
        purge = fleet.cli("cache", "purge", first.headers["X-Cache-Key"])
        assert purge.returncode == 0, purge.stderr
        assert "removed 1 entry" in purge.stdout
        time.sleep(0.3)  # the memory tiers look at the purge generation every 0.1 s
        after = [embed(session, proxy, url, "to be purged") for proxy in (fleet.b, fleet.a)]
    assert [answer.headers["X-Cache"] for answer in after] == ["MISS", "HIT"]
    assert after[0].content != first.content  # computed again, not the purged answer


def test_a_proxy_started_while_redis_is_down_serves_and_caches_once_it_is_up(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)  # its port is chosen, nothing listens there yet
    with Upstream(model_version="v1") as upstream:
        url = upstream.url("/v1/embeddings")
        with start_proxy(tmp_path, "--cache-backend", redis.url) as proxy, fresh_session() as session:
            answers = [embed(session, proxy, url, "before redis") for _ in range(2)]
            assert [answer.status_code for answer in answers] == [200, 200]
            assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "MISS"]
            assert "is unreachable" in proxy.log() and "using a secret for this process only" in proxy.log()
            with redis:
                decisions: list[str] = []

                def cached() -> bool:
                    decisions.append(embed(session, proxy, url, "after redis").headers["X-Cache"])
                    time.sleep(0.2)
                    return decisions[-1] == "HIT" and "read the shared key secret" in proxy.log()

                wait_until(cached, 30, lambda: str(decisions))
                assert redis.command("EXISTS", "fp:partition-secret") == b":1\r\n"
                # Stored under the shared secret now (a MISS if the HIT above came just before it was read),
                # so another proxy on this Redis finds it.
                assert embed(session, proxy, url, "after redis").status_code == 200
                with start_proxy(tmp_path / "other", "--cache-backend", redis.url) as other:
                    assert embed(session, other, url, "after redis").headers["X-Cache"] == "HIT"


class RequestLoop(threading.Thread):
    """Requests through A and B, alternately, until stopped (at most `limit`); records every outcome."""

    def __init__(self, fleet: Fleet, limit: int = 3000) -> None:
        super().__init__(daemon=True)
        self.fleet, self.limit = fleet, limit
        self.stopping = threading.Event()
        self.outcomes: list[tuple[int, str]] = []  # (status or 0 for a failure, X-Cache)
        self.failures: list[str] = []

    def run(self) -> None:
        url = self.fleet.upstream.url("/v1/embeddings")
        with fresh_session() as session:
            for index in range(self.limit):
                if self.stopping.is_set():
                    return
                proxy = self.fleet.proxies[index % 2]
                try:
                    answer = embed(session, proxy, url, f"loop {index % 10}")
                except requests.RequestException as exc:
                    self.failures.append(repr(exc))
                    self.outcomes.append((0, ""))
                    continue
                if answer.status_code != 200:
                    self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                self.outcomes.append((answer.status_code, answer.headers.get("X-Cache", "")))
                time.sleep(0.01)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


def test_redis_stopped_and_restarted_mid_run_fails_no_request_and_caching_resumes(fleet: Fleet) -> None:
    loop = RequestLoop(fleet)
    loop.start()
    try:
        wait_until(lambda: len(loop.outcomes) >= 20, 30)
        fleet.redis.stop()
        down_from = len(loop.outcomes)
        wait_until(lambda: len(loop.outcomes) >= down_from + 40, 60, lambda: str(loop.failures))
        fleet.redis.start()  # the same port, empty
        up_from = len(loop.outcomes)
        wait_until(lambda: len(loop.outcomes) >= up_from + 60, 60, lambda: str(loop.failures))
    finally:
        loop.stop()
    assert loop.failures == []
    assert all(status == 200 for status, _ in loop.outcomes)
    while_down = [decision for _, decision in loop.outcomes[down_from + 5 : up_from]]
    assert "HIT" not in while_down  # forwarded uncached (and not from a memory tier) while Redis was gone
    assert "HIT" in [decision for _, decision in loop.outcomes[up_from:]]
    for proxy in fleet.proxies:
        assert "is unreachable" in proxy.log() and "requests are forwarded uncached" in proxy.log()
        assert "is back after" in proxy.log()

    # Caching resumed in Redis itself: a new answer stored through A is a hit through B (no copy in B's tier).
    url = fleet.upstream.url("/v1/embeddings")
    with fresh_session() as session:
        miss = embed(session, fleet.a, url, "after the outage")
        hit = embed(session, fleet.b, url, "after the outage")
    assert (miss.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
    # The counts made while Redis was gone (store errors happen only then) were kept in memory and written
    # to the restarted, empty Redis once it was back.
    wait_until(lambda: fleet.stats()["store_errors"] > 0, 10, lambda: str(fleet.stats()))
