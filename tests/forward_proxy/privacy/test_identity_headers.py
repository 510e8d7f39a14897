"""Through `forward-proxy run`: no header that carries a client's address or certificate identity reaches
the upstream, on a cached route (the cache's own upstream client) and an uncached one (mitmproxy's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.forward_proxy.privacy.harness import http_request
from tests.support.proxy import start_proxy
from tests.support.upstream import Received, Upstream

pytestmark = [pytest.mark.integration]

# The headers of issue 12, spelled as clients send them (underscores included), and some only the rule
# of IDENTITY_PATTERNS names.
IDENTITY = {
    "X-Forwarded-Client-Cert": 'By=spiffe://mesh/ns/a/sa/b;Hash=ab12;Subject="CN=mallory"',
    "X-Original-Forwarded-For": "203.0.113.7",
    "X-Envoy-External-Address": "203.0.113.8",
    "Forwarded-For": "203.0.113.9",
    "X-Forwarded": "for=203.0.113.10",
    "X-ProxyUser-Ip": "203.0.113.11",
    "X-Azure-ClientIP": "203.0.113.12",
    "X-Appengine-User-IP": "203.0.113.13",
    "X-Remote-Addr": "203.0.113.14",
    "X_Forwarded_For": "203.0.113.15",
    "X_Real_IP": "203.0.113.16",
    "X-Akamai-Client-IP": "203.0.113.17",
    "X-SSL-Client-DN": "CN=mallory,O=example",
    "CF-Connecting-IPv6": "2001:db8::7",
}
KEPT = {"Accept": "application/json", "X-Request-Id": "req-1"}


def _leaks(received: Received) -> list[str]:
    sent = {name.lower() for name in IDENTITY}
    names = [name for name, _ in received.headers if name.lower() in sent]
    values = [value for _, value in received.headers if "203.0.113" in value or "mallory" in value]
    return names + values


def test_no_identity_header_reaches_the_upstream_on_cached_and_uncached_routes(tmp_path: Path) -> None:
    with Upstream() as upstream, start_proxy(tmp_path) as proxy:
        plain = http_request(
            proxy.host, proxy.port, upstream.url("/privacy/echo"), headers={**IDENTITY, **KEPT}
        )
        assert plain.status == 200, plain.body
        body = json.dumps({"model": "m", "input": ["a text"]}).encode()
        cached = http_request(
            proxy.host,
            proxy.port,
            upstream.url("/v1/embeddings"),
            method="POST",
            headers={**IDENTITY, **KEPT, "Content-Type": "application/json"},
            body=body,
        )
        assert cached.status == 200, cached.body
        assert cached.header("X-Cache") == "MISS"
        [uncached_call] = upstream.received("/privacy/echo")
        [cached_call] = upstream.received("/v1/embeddings")
    for call in (uncached_call, cached_call):
        assert _leaks(call) == [], f"{call.method} {call.path} leaked {_leaks(call)}"
        assert call.header("X-Request-Id") == "req-1"  # other headers pass
