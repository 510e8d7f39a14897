"""The policy addons driven through mitmproxy's test context: no sockets, a fake resolver."""

from __future__ import annotations

import json
import logging
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.addons.proxyauth import ProxyAuth, mkauth
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow, tutils

from forward_proxy.policy.addon import ClientAccess, EgressGuard

CONNECT_LOG = "forward_proxy.policy.addon"


class FakeResolver:
    """Answers from a table and records every lookup; unknown names fail like getaddrinfo does."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return self.table[host]


def run(tctx: taddons.context, coroutine: Coroutine[Any, Any, None]) -> None:
    tctx.master.event_loop.run_until_complete(coroutine)


def request_flow(url: str, *, host_header: str | None = None, method: str = "GET") -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = method
    flow.request.url = url
    if host_header is not None:
        flow.request.headers["Host"] = host_header
    return flow


def connect_flow(host: str, port: int) -> http.HTTPFlow:
    request = tutils.treq(
        method=b"CONNECT", scheme=b"", host=host, port=port, authority=f"{host}:{port}".encode(), path=b""
    )
    flow = tflow.tflow(req=request)
    flow.server_conn.address = None
    flow.server_conn.sni = None
    return flow


def error_of(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    assert flow.response.headers["Content-Type"] == "application/json"
    error: dict[str, Any] = json.loads(flow.response.get_text() or "")["error"]
    return error


# --- EgressGuard ------------------------------------------------------------------------------------


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver(
        {
            "localhost": ["::1", "127.0.0.1"],
            "model-api.internal": ["10.0.0.5"],
            "metadata.google.internal": ["169.254.169.254"],
            "rebind.example": ["93.184.216.34", "169.254.169.254"],
            "api.example.com": ["93.184.216.34"],
        }
    )


@pytest.fixture
def guard(resolver: FakeResolver) -> EgressGuard:
    return EgressGuard(resolver=resolver)


@pytest.fixture
def tctx(guard: EgressGuard) -> Iterator[taddons.context]:
    with taddons.context(guard) as context:
        yield context


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://169.254.169.254/latest/meta-data/", "class:metadata"),
        ("http://2852039166/", "class:metadata"),
        ("http://0xA9FEA9FE/", "class:metadata"),
        ("http://[::ffff:169.254.169.254]/", "class:metadata"),
        ("http://[fd00:ec2::254]/", "class:metadata"),
        ("http://0.0.0.0:8000/", "class:unspecified"),
        ("http://169.254.1.1/", "class:link_local"),
    ],
)
def test_literal_destinations_are_refused_without_dns(
    tctx: taddons.context, guard: EgressGuard, resolver: FakeResolver, url: str, rule: str
) -> None:
    flow = request_flow(url)
    run(tctx, guard.requestheaders(flow))
    assert flow.response is not None and flow.response.status_code == 403
    error = error_of(flow)
    assert (error["code"], error["rule"]) == ("egress_denied", rule)
    assert rule in error["message"]
    assert resolver.lookups == []


def test_a_name_resolving_into_a_denied_range_is_refused(tctx: taddons.context, guard: EgressGuard) -> None:
    flow = request_flow("http://metadata.google.internal/computeMetadata/v1/")
    run(tctx, guard.requestheaders(flow))
    error = error_of(flow)
    assert (error["rule"], error["host"], error["address"]) == (
        "class:metadata",
        "metadata.google.internal",
        "169.254.169.254",
    )


def test_one_denied_address_among_several_refuses_the_name(tctx: taddons.context, guard: EgressGuard) -> None:
    flow = request_flow("http://rebind.example/")
    run(tctx, guard.requestheaders(flow))
    assert error_of(flow)["address"] == "169.254.169.254"


def test_an_allowed_name_is_pinned_to_the_checked_address_with_its_host_header(
    tctx: taddons.context, guard: EgressGuard, resolver: FakeResolver
) -> None:
    flow = request_flow("http://localhost:8000/v1/embeddings", host_header="localhost:8000")
    run(tctx, guard.requestheaders(flow))
    assert flow.response is None
    assert (flow.request.host, flow.request.port) == ("127.0.0.1", 8000)  # where mitmproxy connects
    assert flow.request.headers["Host"] == "localhost:8000"
    assert flow.request.pretty_host == "localhost"
    assert flow.metadata["fp.egress"] == "class:loopback"
    assert flow.metadata["fp.egress.host"] == "localhost"
    assert resolver.lookups == ["localhost"]  # resolved once


def test_a_request_without_host_header_gets_one_before_pinning(
    tctx: taddons.context, guard: EgressGuard
) -> None:
    flow = request_flow("http://model-api.internal:8000/x")
    assert "Host" not in flow.request.headers
    run(tctx, guard.requestheaders(flow))
    assert flow.request.host == "10.0.0.5"
    assert flow.request.headers["Host"] == "model-api.internal:8000"


def test_unresolvable_names_get_a_502_in_the_error_shape(tctx: taddons.context, guard: EgressGuard) -> None:
    flow = request_flow("http://nothing.invalid/")
    run(tctx, guard.requestheaders(flow))
    assert flow.response is not None and flow.response.status_code == 502
    assert error_of(flow)["code"] == "upstream_unresolvable"


def test_options_deny_loopback_and_private(tctx: taddons.context, guard: EgressGuard) -> None:
    tctx.configure(guard, egress_deny_loopback=True, egress_deny_private=True)
    for url, rule in [
        ("http://localhost:8000/", "class:loopback"),
        ("http://model-api.internal/", "class:private"),
    ]:
        flow = request_flow(url)
        run(tctx, guard.requestheaders(flow))
        assert error_of(flow)["rule"] == rule


def test_deny_and_allow_lists(tctx: taddons.context, guard: EgressGuard) -> None:
    tctx.configure(guard, egress_deny=[".example.com"], egress_allow=["169.254.169.254/32"])
    denied = request_flow("http://api.example.com/")
    run(tctx, guard.requestheaders(denied))
    assert error_of(denied)["rule"] == "deny:.example.com"
    allowed = request_flow("http://169.254.169.254/")
    run(tctx, guard.requestheaders(allowed))
    assert allowed.response is None
    assert allowed.metadata["fp.egress"] == "allow:169.254.169.254/32"


def test_denied_names_are_refused_before_any_dns_lookup(
    tctx: taddons.context, guard: EgressGuard, resolver: FakeResolver
) -> None:
    tctx.configure(guard, egress_deny=[".corp.example"])
    flow = request_flow("http://secrets.corp.example/")
    run(tctx, guard.requestheaders(flow))
    assert error_of(flow)["rule"] == "deny:.corp.example"
    assert resolver.lookups == []


def test_bad_rules_are_refused_at_configure(tctx: taddons.context, guard: EgressGuard) -> None:
    with pytest.raises(exceptions.OptionsError, match="egress_deny"):
        tctx.configure(guard, egress_deny=["http://x/"])


def test_every_decision_writes_one_canonical_line(
    tctx: taddons.context, guard: EgressGuard, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CONNECT_LOG)
    run(tctx, guard.requestheaders(request_flow("http://2852039166/")))
    run(tctx, guard.requestheaders(request_flow("http://localhost:8000/")))
    lines = [r.getMessage() for r in caplog.records if r.name == CONNECT_LOG]
    assert len(lines) == 2
    assert lines[0].startswith(
        "egress decision=deny rule=class:metadata host=2852039166 address=169.254.169.254"
    )
    assert lines[1].startswith("egress decision=allow rule=class:loopback host=localhost address=127.0.0.1")
    assert all(getattr(r, "client", None) for r in caplog.records if r.name == CONNECT_LOG)


def test_flows_already_answered_are_left_alone(
    tctx: taddons.context, guard: EgressGuard, resolver: FakeResolver
) -> None:
    flow = request_flow("http://169.254.169.254/")
    flow.response = http.Response.make(407)
    run(tctx, guard.requestheaders(flow))
    assert flow.response.status_code == 407
    assert "fp.egress" not in flow.metadata


def test_connect_to_a_denied_address_is_refused(tctx: taddons.context, guard: EgressGuard) -> None:
    flow = connect_flow("169.254.169.254", 443)
    run(tctx, guard.http_connect(flow))
    assert flow.response is not None and flow.response.status_code == 403
    assert error_of(flow)["rule"] == "class:metadata"


def test_connect_is_pinned_and_keeps_the_name_for_tls(tctx: taddons.context, guard: EgressGuard) -> None:
    flow = connect_flow("localhost", 8443)
    run(tctx, guard.http_connect(flow))
    assert flow.response is None
    assert flow.request.host == "127.0.0.1"
    assert flow.server_conn.sni == "localhost"  # the upstream certificate is checked against the name


def test_requests_inside_a_pinned_tunnel_are_judged_by_the_tunnels_name(
    tctx: taddons.context, guard: EgressGuard
) -> None:
    tctx.configure(guard, egress_allow_only=True, egress_allow=["api.example.com"])
    tunnel = connect_flow("api.example.com", 443)
    run(tctx, guard.http_connect(tunnel))
    assert tunnel.response is None
    # mitmproxy sets the host of a request inside the tunnel to the tunnel's (pinned) address
    tunnel.server_conn.address = (tunnel.request.host, 443)
    inner = tflow.tflow(client_conn=tunnel.client_conn, server_conn=tunnel.server_conn)
    inner.request.url = "https://93.184.216.34/v1/embeddings"
    inner.request.headers["Host"] = "api.example.com"
    run(tctx, guard.requestheaders(inner))
    assert inner.response is None
    assert inner.metadata["fp.egress"] == "allow:api.example.com"


def server_connect(server_address: tuple[str, int]) -> server_hooks.ServerConnectionHookData:
    flow = tflow.tflow()
    flow.server_conn.address = server_address
    flow.server_conn.sni = None
    flow.server_conn.error = None
    return server_hooks.ServerConnectionHookData(server=flow.server_conn, client=flow.client_conn)


def test_server_connect_never_opens_a_denied_address(tctx: taddons.context, guard: EgressGuard) -> None:
    data = server_connect(("169.254.169.254", 80))
    run(tctx, guard.server_connect(data))
    assert data.server.error is not None and "class:metadata" in data.server.error


def test_server_connect_checks_and_pins_names_that_skipped_the_request_check(
    tctx: taddons.context, guard: EgressGuard
) -> None:
    denied = server_connect(("metadata.google.internal", 80))
    run(tctx, guard.server_connect(denied))
    assert denied.server.error is not None
    allowed = server_connect(("localhost", 8000))
    run(tctx, guard.server_connect(allowed))
    assert allowed.server.error is None
    assert allowed.server.address == ("127.0.0.1", 8000)
    assert allowed.server.sni == "localhost"


# --- ClientAccess -----------------------------------------------------------------------------------


def client_from(address: str) -> Any:
    client = tflow.tclient_conn()
    client.peername = (address, 40000)
    client.error = None
    return client


def test_clients_outside_the_allowed_networks_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    access = ClientAccess()
    with taddons.context(access) as tctx:
        tctx.configure(access, allow_clients=["127.0.0.2/32"])
        caplog.set_level(logging.WARNING, logger=CONNECT_LOG)
        inside, outside = client_from("127.0.0.2"), client_from("127.0.0.3")
        access.client_connected(inside)
        access.client_connected(outside)
    assert inside.error is None
    assert outside.error is not None and "allow_clients" in outside.error
    refusals = [r for r in caplog.records if r.getMessage().startswith("client refused")]
    assert len(refusals) == 1
    assert refusals[0].client == ("127.0.0.3", 40000)  # type: ignore[attr-defined]
    assert "127.0.0.3" not in refusals[0].getMessage()  # the address only travels as the record's client


def test_default_networks_refuse_public_clients() -> None:
    access = ClientAccess()
    with taddons.context(access):
        public, private = client_from("8.8.8.8"), client_from("::ffff:192.168.1.20")
        access.client_connected(public)
        access.client_connected(private)
    assert public.error is not None
    assert private.error is None


def test_an_empty_allow_list_is_refused_at_configure() -> None:
    access = ClientAccess()
    with taddons.context(access) as tctx, pytest.raises(exceptions.OptionsError, match="nobody"):
        tctx.configure(access, allow_clients=[])


def test_failed_proxy_auth_is_answered_in_the_json_error_shape() -> None:
    auth, access = ProxyAuth(), ClientAccess()
    with taddons.context(auth, access) as tctx:
        tctx.configure(auth, proxyauth="alice:secret")
        refused = request_flow("http://127.0.0.1:8000/")
        auth.requestheaders(refused)
        access.requestheaders(refused)
        accepted = request_flow("http://127.0.0.1:8000/")
        accepted.request.headers["Proxy-Authorization"] = mkauth("alice", "secret")
        auth.requestheaders(accepted)
        access.requestheaders(accepted)
    assert refused.response is not None and refused.response.status_code == 407
    assert error_of(refused)["code"] == "proxy_auth_required"
    assert refused.response.headers["Proxy-Authenticate"].startswith("Basic")
    assert accepted.response is None
    assert "Proxy-Authorization" not in accepted.request.headers
