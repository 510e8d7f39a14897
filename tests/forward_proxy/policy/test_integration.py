"""Through the real proxy process: who may use it, proxy authentication, and where it may connect."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from forward_proxy.privacy.pseudonym import Pseudonyms, load_or_create_key
from tests.forward_proxy.privacy.harness import (
    IDENTITY_HEADERS,
    TlsUpstream,
    http_request,
    https_get_through,
    mitmdump,
    open_tunnel,
    self_signed_certificate,
)
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Upstream

pytestmark = [pytest.mark.integration]

METADATA_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://2852039166/latest/meta-data/",
    "http://0xA9FEA9FE/latest/meta-data/",
    "http://0251.0376.0251.0376/",
    "http://[::ffff:169.254.169.254]/",
    "http://[fd00:ec2::254]/latest/meta-data/",
]
METADATA_TUNNELS = ["169.254.169.254:443", "2852039166:443", "[fd00:ec2::254]:443"]
ALICE = "Basic YWxpY2U6c2VjcmV0"  # alice:secret


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[TlsUpstream]:
    cert, key = self_signed_certificate(tmp_path)  # valid for the name "localhost" only, not 127.0.0.1
    with TlsUpstream(cert, key).running() as server:
        yield server


def pseudonym(proxy: RunningProxy, address: str) -> str:
    return Pseudonyms(load_or_create_key(proxy.cache_dir / "pseudonym.key")).of(address)


def test_clients_outside_allow_clients_are_refused_at_connect(tmp_path: Path, upstream: Upstream) -> None:
    with start_proxy(tmp_path, "--allow-clients", "127.0.0.2/32,10.0.0.0/8") as proxy:
        admitted = http_request(proxy.host, proxy.port, upstream.url("/policy/x"), source="127.0.0.2")
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            http_request(proxy.host, proxy.port, upstream.url("/policy/x"), source="127.0.0.3")
        refused_id = pseudonym(proxy, "127.0.0.3")
    assert admitted.status == 200
    assert upstream.calls("/policy/x") == 1
    refusals = [line for line in proxy.log().splitlines() if "client refused" in line]
    assert len(refusals) == 1 and refused_id in refusals[0], proxy.log()
    assert "127.0.0.3" not in proxy.log()


def htpasswd_file(tmp_path: Path) -> str:
    path = tmp_path / "htpasswd"
    path.write_text("alice:" + bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode() + "\n")
    return f"@{path}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["user:password", "htpasswd"])
def test_proxy_auth_accepts_refuses_and_never_forwards_credentials(
    tmp_path: Path, upstream: Upstream, tls_upstream: TlsUpstream, kind: str
) -> None:
    spec = "alice:secret" if kind == "user:password" else htpasswd_file(tmp_path)
    with start_proxy(tmp_path, "--proxyauth", spec) as proxy:
        url = upstream.url("/policy/auth")
        missing = http_request(proxy.host, proxy.port, url)
        wrong = http_request(
            proxy.host, proxy.port, url, headers={"Proxy-Authorization": "Basic YWxpY2U6bm8="}
        )
        right = http_request(proxy.host, proxy.port, url, headers={"Proxy-Authorization": ALICE})
        tunnel_refused = open_tunnel(proxy.host, proxy.port, f"localhost:{tls_upstream.port}")
        tunnel = open_tunnel(
            proxy.host, proxy.port, f"localhost:{tls_upstream.port}", headers={"Proxy-Authorization": ALICE}
        )
        inside = https_get_through(tunnel, "localhost", tls_upstream.cert, "/inside", {})

    for refused in (missing, wrong):
        assert refused.status == 407
        assert (refused.header("Proxy-Authenticate") or "").startswith("Basic")
        assert refused.json()["error"]["code"] == "proxy_auth_required"
    assert tunnel_refused.status == 407
    assert json.loads(tunnel_refused.body)["error"]["code"] == "proxy_auth_required"
    assert right.status == 200 and tunnel.status == 200 and inside.status == 200

    assert upstream.calls("/policy/auth") == 1
    forwarded = upstream.received("/policy/auth")[0]
    assert forwarded.header("Proxy-Authorization") is None and forwarded.header("Authorization") is None
    assert "YWxpY2U6c2VjcmV0" not in repr(forwarded.headers)
    assert [seen.path for seen in tls_upstream.seen] == ["/inside"]
    assert "YWxpY2U6c2VjcmV0" not in repr(tls_upstream.seen[0].headers)


@pytest.mark.slow
def test_default_policy_refuses_metadata_for_http_and_connect_and_pins_allowed_names(
    tmp_path: Path, upstream: Upstream, tls_upstream: TlsUpstream
) -> None:
    with start_proxy(tmp_path) as proxy:
        refused = [http_request(proxy.host, proxy.port, url, source="127.0.0.2") for url in METADATA_URLS]
        tunnels = [open_tunnel(proxy.host, proxy.port, target) for target in METADATA_TUNNELS]
        by_name = http_request(proxy.host, proxy.port, f"http://localhost:{upstream.port}/policy/pinned")
        tunnel = open_tunnel(proxy.host, proxy.port, f"localhost:{tls_upstream.port}")
        inside = https_get_through(tunnel, "localhost", tls_upstream.cert, "/tls", {})
    log = proxy.log()

    for answer in refused:
        assert answer.status == 403
        error = answer.json()["error"]
        assert (error["code"], error["rule"]) == ("egress_denied", "class:metadata")
        assert "class:metadata" in error["message"]
    for refused_tunnel in tunnels:
        assert refused_tunnel.status == 403
        assert json.loads(refused_tunnel.body)["error"]["rule"] == "class:metadata"
    denials = [line for line in log.splitlines() if "egress decision=deny rule=class:metadata" in line]
    assert len(denials) == len(METADATA_URLS) + len(METADATA_TUNNELS)
    assert "stage=server_connect" not in log  # refused at the request, before any connection step
    assert "127.0.0.2" not in log

    # an allowed name: connected to the checked address, the upstream still sees the name it was asked for
    assert by_name.status == 200
    assert upstream.received("/policy/pinned")[0].header("Host") == f"localhost:{upstream.port}"
    # a CONNECT to a local TLS server passes through; the client verified the server's name itself
    assert tunnel.status == 200 and inside.status == 200 and inside.json() == {"tls": True}
    assert [(seen.path, seen.sni) for seen in tls_upstream.seen] == [("/tls", "localhost")]


@pytest.mark.slow
def test_intercepted_tunnels_keep_the_name_for_tls_and_are_masked_inside(
    tmp_path: Path, tls_upstream: TlsUpstream
) -> None:
    """The tunnel is pinned to 127.0.0.1, yet the proxy's TLS to the upstream still uses and verifies the
    name "localhost" (the certificate is valid for nothing else)."""
    confdir = tmp_path / "confdir"
    settings = [
        f"confdir={confdir}",
        "intercept_hosts=localhost",
        f"ssl_verify_upstream_trusted_ca={tls_upstream.cert}",
    ]
    with start_proxy(tmp_path, *[arg for s in settings for arg in ("--set", s)]) as proxy:
        tunnel = open_tunnel(proxy.host, proxy.port, f"localhost:{tls_upstream.port}", source="127.0.0.2")
        inside = https_get_through(
            tunnel, "localhost", confdir / "mitmproxy-ca-cert.pem", "/intercepted", IDENTITY_HEADERS
        )
        expected_id = pseudonym(proxy, "127.0.0.2")
    assert inside.status == 200, inside.body
    [seen] = tls_upstream.seen
    assert (seen.path, seen.sni) == ("/intercepted", "localhost")
    names = {name.lower() for name, _ in seen.headers}
    assert not names & {name.lower() for name in IDENTITY_HEADERS if name != "X-Client-Pseudonym"}
    assert dict(seen.headers)["X-Client-Pseudonym"] == expected_id


def test_a_name_resolving_into_a_denied_range_is_refused(tmp_path: Path, upstream: Upstream) -> None:
    with start_proxy(
        tmp_path, "--set", "egress_deny_loopback=true", "--set", "egress_deny=.corp.example"
    ) as proxy:
        by_name = http_request(proxy.host, proxy.port, f"http://localhost:{upstream.port}/policy/x")
        tunnel = open_tunnel(proxy.host, proxy.port, f"localhost:{upstream.port}")
        denied_domain = http_request(proxy.host, proxy.port, "http://db.corp.example/")
    assert by_name.status == 403
    assert by_name.json()["error"]["rule"] == "class:loopback"
    assert by_name.json()["error"]["host"] == "localhost"
    assert tunnel.status == 403
    assert denied_domain.json()["error"]["rule"] == "deny:.corp.example"  # refused without a DNS answer
    assert upstream.calls() == 0


@pytest.mark.slow
def test_refused_destinations_are_never_connected_to(tmp_path: Path, upstream: Upstream) -> None:
    """mitmdump logs every server connection and every failed attempt; none for the refused addresses."""
    with mitmdump(tmp_path) as proxy:
        assert http_request(proxy.host, proxy.port, upstream.url("/policy/control")).status == 200
        by_name = http_request(proxy.host, proxy.port, f"http://localhost:{upstream.port}/policy/pinned")
        assert by_name.status == 200
        for url in METADATA_URLS:
            assert http_request(proxy.host, proxy.port, url).status == 403
        for target in METADATA_TUNNELS:
            assert open_tunnel(proxy.host, proxy.port, target).status == 403
    log = proxy.log()
    assert f"server connect 127.0.0.1:{upstream.port}" in log  # the log does show connections
    # pinned: mitmproxy connected to the checked address, not to the name (it would log "localhost:...")
    assert "server connect localhost" not in log
    connection_lines = [
        line for line in log.splitlines() if "server connect" in line or "server connection" in line
    ]
    assert connection_lines and not [line for line in connection_lines if "169.254" in line or "fd00" in line]
