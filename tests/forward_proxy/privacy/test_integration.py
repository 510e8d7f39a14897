"""Through the real proxy process: what upstreams learn about clients, and what the proxy prints.

Clients are bound to 127.0.0.2 and 127.0.0.3 and send every identity header; the recording upstream on
loopback must see none of them, no client address anywhere, and one stable pseudonym per client that
survives a restart and changes with the key.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.forward_proxy.privacy.harness import IDENTITY_HEADERS, http_request, mitmdump
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Received, Upstream

pytestmark = [pytest.mark.integration]

CLIENTS = ("127.0.0.2", "127.0.0.3")
GIVEAWAYS = ("127.0.0.2", "127.0.0.3", "203.0.113", "198.51.100", "mallory", "c-forged")


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


def ask(proxy: RunningProxy, upstream: Upstream, source: str, serial: int) -> None:
    """A plain request (forwarded by mitmproxy) and a cached route (fetched by the cache's own client)."""
    answer = http_request(
        proxy.host, proxy.port, upstream.url("/privacy/echo"), source=source, headers=IDENTITY_HEADERS
    )
    assert answer.status == 200, answer.body
    body = json.dumps({"model": "m", "input": [f"text {serial} from a client"]}).encode()
    headers = {**IDENTITY_HEADERS, "Content-Type": "application/json"}
    cached_route = http_request(
        proxy.host,
        proxy.port,
        upstream.url("/v1/embeddings"),
        source=source,
        method="POST",
        headers=headers,
        body=body,
    )
    assert cached_route.status == 200, cached_route.body
    assert cached_route.header("X-Cache") == "MISS"


def pseudonyms_seen(received: list[Received]) -> list[str | None]:
    return [r.header("X-Client-Pseudonym") for r in received]


def assert_nothing_identifies_the_clients(received: list[Received]) -> None:
    identity = {name.lower() for name in IDENTITY_HEADERS} - {"x-client-pseudonym"}
    for request in received:
        names = {name.lower() for name, _ in request.headers}
        assert not names & identity, f"identity headers reached the upstream: {names & identity}"
        everything = request.method + " " + request.path + " " + repr(request.headers)
        for giveaway in GIVEAWAYS:
            assert giveaway not in everything, f"{giveaway!r} reached the upstream: {everything}"


@pytest.mark.slow
def test_upstream_sees_only_a_stable_pseudonym_per_client_across_restarts_until_the_key_rotates(
    tmp_path: Path, upstream: Upstream
) -> None:
    cache_dir = tmp_path / "cache"
    serials = itertools.count()  # every embeddings body differs, so each one reaches the upstream

    def two_requests_per_client() -> list[str | None]:
        upstream.clear()
        with start_proxy(tmp_path, cache_dir=cache_dir) as proxy:
            for source in CLIENTS * 2:
                ask(proxy, upstream, source, next(serials))
            # a refused request: its log line is a warning, printed whatever the verbosity
            for source in CLIENTS:
                denied = http_request(proxy.host, proxy.port, "http://169.254.169.254/", source=source)
                assert denied.status == 403
        log = proxy.log()
        received = upstream.received("/privacy/echo")
        assert len(received) == 4
        assert_nothing_identifies_the_clients(received)
        through_the_cache = upstream.received("/v1/embeddings")
        assert len(through_the_cache) == 4
        assert_nothing_identifies_the_clients(through_the_cache)
        ids = pseudonyms_seen(received)
        assert pseudonyms_seen(through_the_cache) == ids
        assert all(ids), ids
        for address in CLIENTS:
            assert address not in log, f"{address} in the proxy's output:\n{log}"
        for pseudonym in set(ids):
            assert pseudonym is not None and pseudonym in log
        return ids

    first = two_requests_per_client()
    assert first[0] == first[2] and first[1] == first[3]  # stable per client
    assert first[0] != first[1]  # distinct between clients

    assert two_requests_per_client() == first  # same key file, same pseudonyms after a restart

    key_file = cache_dir / "pseudonym.key"
    assert key_file.stat().st_mode & 0o077 == 0
    rotate = subprocess.run(
        [sys.executable, "-m", "forward_proxy.privacy.pseudonym", "rotate", str(key_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rotate.returncode == 0, rotate.stderr
    rotated = two_requests_per_client()
    assert rotated[0] == rotated[2] != rotated[1] == rotated[3]
    assert not set(rotated) & set(first)


@pytest.mark.slow
def test_mitmdump_with_the_addon_list_prints_pseudonyms_and_never_client_addresses(
    tmp_path: Path, upstream: Upstream
) -> None:
    """mitmdump prints every flow and every connection (`[127.0.0.2:40112] client connect`): scrubbed."""

    def run_mitmdump(*settings: str) -> str:
        with mitmdump(tmp_path, *settings) as proxy:
            for source in CLIENTS:
                answer = http_request(
                    proxy.host,
                    proxy.port,
                    upstream.url("/privacy/echo"),
                    source=source,
                    headers=IDENTITY_HEADERS,
                )
                assert answer.status == 200
        return proxy.log()

    masked = run_mitmdump()
    assert "client connect" in masked and "GET http://" in masked  # mitmdump's own lines are there
    for address in CLIENTS:
        assert address not in masked, masked
    assert masked.count("[c-") >= 4  # client connect / disconnect lines carry pseudonyms
    assert_nothing_identifies_the_clients(upstream.received("/privacy/echo"))

    upstream.clear()
    transparent = run_mitmdump("--set", "forwarded_for=transparent")
    assert all(address in transparent for address in CLIENTS)  # masking off: addresses are shown
    forwarded = [r.header("X-Forwarded-For") for r in upstream.received("/privacy/echo")]
    assert forwarded == [IDENTITY_HEADERS["X-Forwarded-For"]] * 2
