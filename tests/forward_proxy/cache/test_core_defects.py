"""Three defects of the former cache core (issue 11), each through a real `forward-proxy run` against real
loopback upstreams; the others are in `test_one_engine.py`. A cached route skipped the upstream proxy of
`--mode upstream:`; there, a name that rebinds after the egress check reached a denied address, and its
answer was cached; a hung Redis stalled requests that never touch the store."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from forward_proxy.cache.checks import Service, TlsTrust, ask
from tests.support.nameserver import Nameserver, resolving_through
from tests.support.proxy import start_proxy
from tests.support.redis_server import RedisServer, redis_available
from tests.support.upstream import Upstream, self_signed_certificate
from tests.support.upstream_proxy import UpstreamProxy

pytestmark = pytest.mark.integration

CACHED = "/v2/models/m/infer"  # a default cache rule
UNCACHED = "/v1/models"
VERSION_CHECK = ("GET", "/v2/health/live")  # the default version_check_path


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream(model_version="v1") as server:
        yield server


def test_upstream_mode_sends_cached_routes_through_the_upstream_proxy(
    tmp_path: Path, upstream: Upstream
) -> None:
    with (
        UpstreamProxy() as via,
        start_proxy(tmp_path, "--set", f"mode=upstream:{via.url}") as proxy,
        proxy.session() as session,
    ):
        miss, hit = (session.post(upstream.url(CACHED), json={"inputs": []}, timeout=30) for _ in range(2))
        plain = session.get(upstream.url(UNCACHED), timeout=30)
    assert [miss.status_code, hit.status_code, plain.status_code] == [200, 200, 200]
    assert [miss.headers["X-Cache"], hit.headers["X-Cache"]] == ["MISS", "HIT"]
    forwarded = [(r.method, r.target, r.status) for r in via.received()]
    checks = [entry for entry in forwarded if entry[:2] == (VERSION_CHECK[0], upstream.url(VERSION_CHECK[1]))]
    assert [entry for entry in forwarded if entry not in checks] == [
        ("POST", upstream.url(CACHED), 200),  # the miss, in absolute form; the hit never left the proxy
        ("GET", upstream.url(UNCACHED), 200),
    ]
    assert upstream.calls(CACHED) == 1 and upstream.calls(UNCACHED) == 1
    # The cache's own version check goes the same way (the upstream proxy resolves the name), never direct.
    assert upstream.calls(VERSION_CHECK[1]) == len(checks)


@pytest.mark.parametrize("mode", ["regular", "upstream"])
def test_a_name_that_rebinds_to_a_denied_address_never_reaches_it(tmp_path: Path, mode: str) -> None:
    """A name whose DNS answers an allowed address first and a denied one from then on (TTL 0, as a
    rebinding attacker's server does). The egress policy resolves it once per request, and the request
    goes where that check said: to the address it pinned (regular mode) or to the upstream proxy, which
    resolves names itself (to the allowed address, as its own hosts file says). So the first request is
    answered by the allowed address, the later ones are refused, and the denied address gets nothing."""
    with (
        Upstream(host="127.0.0.2") as allowed,
        Upstream(host="127.0.0.3", port=allowed.port) as denied,
        Nameserver() as dns,
        UpstreamProxy(hosts={"rebind.test": "127.0.0.2"}) as via,
    ):
        dns.answer("rebind.test", ["127.0.0.2", "127.0.0.3"])
        args = ["--set", "egress_deny=127.0.0.3"]
        if mode == "upstream":
            args += ["--set", f"mode=upstream:{via.url}"]
        wrapper = resolving_through(dns, tmp_path / "dns")
        with start_proxy(tmp_path, *args, wrapper=wrapper) as proxy, proxy.session() as session:
            url = f"http://rebind.test:{allowed.port}"
            answers = [session.post(url + CACHED, json={"inputs": []}, timeout=30) for _ in range(2)]
            answers.append(session.get(url + UNCACHED, timeout=30))
            log = proxy.log()
        asked = dns.questions("rebind.test")
    reached = [(r.method, r.path) for r in denied.received()]
    assert [path for _, path in reached if path != VERSION_CHECK[1]] == [], (
        log
    )  # nothing asked, so none cached
    assert [answer.status_code for answer in answers] == [200, 403, 403], log
    assert answers[0].headers["X-Cache"] == "MISS" and answers[0].json()["call"] == 1
    assert {answer.json()["error"]["code"] for answer in answers[1:]} == {"egress_denied"}
    assert allowed.calls(CACHED) == 1 and allowed.calls(UNCACHED) == 0
    if mode == "upstream":
        assert via.calls(CACHED) == 1
    assert reached == [], log  # nor the cache's own questions (the version check)
    assert asked == 3, log  # one DNS question per request: the egress policy's


@pytest.mark.redis
@pytest.mark.slow
def test_a_hung_redis_does_not_slow_requests_that_do_not_need_it(tmp_path: Path, upstream: Upstream) -> None:
    """Redis stopped (SIGSTOP: it accepts connections and never answers), every store call waiting out its
    timeout (`socket_timeout=0.25`, redis-py's one retry; `retry_interval=0`: no outage shortcut), under 16
    clients of a cached route. Their requests are answered uncached once the lookup and the fleet lease
    have timed out (about 1s each); a request to an uncached route of a named host (`localhost`, which the
    egress policy resolves) is answered at once. Redis calls run in the store's own threads: in the event
    loop's default executor, which also resolves names, they held all of its 6 threads (2 cores)."""
    if not redis_available():
        pytest.skip("redis-server is not installed (scripts/install-system.sh installs it)")
    clients, window = 16, 4.0
    with RedisServer(tmp_path) as redis:
        backend = f"{redis.url}?prefix={tmp_path.name}:&socket_timeout=0.25&retry_interval=0"
        with start_proxy(tmp_path, "--cache-backend", backend) as proxy, proxy.session() as session:
            warm = [session.post(upstream.url(CACHED), json={"inputs": []}, timeout=30) for _ in range(2)]
            assert [answer.headers["X-Cache"] for answer in warm] == ["MISS", "HIT"]
            deadline = time.monotonic() + window

            def ask_cached(client: int) -> list[tuple[float, int]]:
                timings = []
                with proxy.session() as own:
                    for turn in range(20):  # about one a second: bounded either way
                        if time.monotonic() > deadline:
                            break
                        started = time.monotonic()
                        body = {"inputs": [], "id": f"{client}-{turn}"}  # distinct: no coalescing
                        answer = own.post(upstream.url(CACHED), json=body, timeout=30)
                        timings.append((time.monotonic() - started, answer.status_code))
                return timings

            named: list[tuple[float, int]] = []
            assert redis.process is not None
            os.kill(redis.process.pid, signal.SIGSTOP)
            try:
                with ThreadPoolExecutor(max_workers=clients) as pool:
                    load = [pool.submit(ask_cached, client) for client in range(clients)]
                    time.sleep(0.5)
                    while time.monotonic() < deadline:
                        started = time.monotonic()
                        answer = session.get(f"http://localhost:{upstream.port}{UNCACHED}", timeout=30)
                        named.append((time.monotonic() - started, answer.status_code))
                        time.sleep(0.2)
                    cached = [timing for future in load for timing in future.result()]
            finally:
                os.kill(redis.process.pid, signal.SIGCONT)
            after = session.post(upstream.url(CACHED), json={"inputs": []}, timeout=30)
    assert named and {status for _, status in named} == {200}
    assert max(seconds for seconds, _ in named) < 1.0, named  # a few milliseconds when Redis is well
    assert len(cached) >= clients and {status for _, status in cached} == {200}
    # Each waits out its store calls (about 1 s; 2 s seen on a loaded machine), never Redis itself.
    assert max(seconds for seconds, _ in cached) < 5.0, sorted(cached)
    assert after.headers["X-Cache"] == "HIT"  # Redis back: the entry stored before it hung is served


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_cache_asks_its_own_questions_through_the_upstream_proxy(tmp_path: Path, scheme: str) -> None:
    """`checks.ask` in upstream mode: an http service is asked in absolute form, an https one through a
    CONNECT tunnel with TLS to the service inside it (its private CA trusted, as mitmproxy's option says);
    the proxy is told the name, and resolves it itself."""
    certificate = self_signed_certificate(tmp_path, names=("model.test",)) if scheme == "https" else None
    with (
        Upstream(model_version="v7", certificate=certificate) as service,
        UpstreamProxy(hosts={"model.test": "127.0.0.1"}) as via,
    ):
        where = Service(
            scheme,
            ("model.test", service.port),
            f"model.test:{service.port}",
            "model.test",
            via=(via.host, via.port),
        )
        trust = TlsTrust(trusted_ca=str(certificate or ""))
        answer = asyncio.run(ask(where, VERSION_CHECK[1], [("Accept", "application/json")], 10, trust))
    assert answer.status == 200 and answer.header("X-Model-Version") == "v7"
    assert service.calls(VERSION_CHECK[1]) == 1
    target = (
        f"model.test:{service.port}"
        if scheme == "https"
        else f"http://model.test:{service.port}/v2/health/live"
    )
    method = "CONNECT" if scheme == "https" else "GET"
    assert [(r.method, r.target) for r in via.received()] == [(method, target)]
    assert service.received(VERSION_CHECK[1])[0].header("host") == f"model.test:{service.port}"
