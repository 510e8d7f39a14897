"""Which request headers leave the proxy, mode by mode."""

from __future__ import annotations

import doctest

import pytest
from mitmproxy.http import Headers

from forward_proxy.privacy import masking
from forward_proxy.privacy.masking import IDENTITY_HEADERS, PROXY_HEADERS, Masking

NEUTRAL = [
    ("Accept", "application/json"),
    ("Content-Type", "application/json"),
    ("Authorization", "Bearer t"),
]
IDENTITY = [(name, "10.9.8.7") for name in IDENTITY_HEADERS]
PROXY = [("Proxy-Authorization", "Basic YWxpY2U6c2VjcmV0"), ("Proxy-Connection", "keep-alive")]


def headers(*pairs: tuple[str, str]) -> Headers:
    return Headers([(k.encode(), v.encode()) for k, v in pairs])


def test_the_identity_list_covers_the_issue() -> None:
    expected = {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-server",
        "x-real-ip",
        "x-client-ip",
        "x-originating-ip",
        "true-client-ip",
        "client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-cluster-client-ip",
        "via",
        "x-forwarded-client-cert",
        "x-original-forwarded-for",
        "x-envoy-external-address",
        "forwarded-for",
        "x-forwarded",
        "x-proxyuser-ip",
        "x-azure-clientip",
        "x-appengine-user-ip",
        "x-remote-addr",
    }
    assert expected <= {name.lower() for name in IDENTITY_HEADERS}
    assert {name.lower() for name in PROXY_HEADERS} == {"proxy-authorization", "proxy-connection"}


# Names no list holds: the rule of IDENTITY_PATTERNS catches them; underscores read as dashes.
BY_THE_RULE = [
    "X_Forwarded_For",
    "x_real_ip",
    "X-Forwarded-Client-Cert-Chain",
    "CF-Connecting-IPv6",
    "X-Akamai-Client-IP",
    "X-Ssl-Client-Dn",
    "X-Custom-Real-IP",
    "X-Upstream-Remote-Addr",
    "Proxy-Client-Cert",
]
NOT_IDENTITY = [
    "Accept",
    "Content-Type",
    "Authorization",
    "X-Api-Key",
    "OpenAI-Organization",
    "User-Agent",
    "X-Request-Id",
    "X-Client-Pseudonym-Other",
    "Accept-Encoding",
]


@pytest.mark.parametrize("name", [*IDENTITY_HEADERS, *BY_THE_RULE])
def test_every_identity_header_is_removed_also_with_underscores(name: str) -> None:
    for spelling in (name, name.replace("-", "_"), name.upper()):
        h = headers((spelling, "10.9.8.7"), ("Accept", "*/*"))
        Masking("delete").apply(h, client="127.0.0.2")
        assert list(h.keys()) == ["Accept"], spelling


@pytest.mark.parametrize("name", NOT_IDENTITY)
def test_headers_without_client_identity_pass(name: str) -> None:
    assert not masking.is_identity_header(name)


def test_delete_removes_every_identity_and_proxy_header() -> None:
    h = headers(*NEUTRAL, *IDENTITY, *PROXY)
    removed = Masking("delete").apply(h, client="127.0.0.2")
    assert list(h.items()) == NEUTRAL
    assert len(removed) == len(IDENTITY) + len(PROXY)


def test_header_names_match_in_any_case_and_repeated_headers_all_go() -> None:
    h = headers(("x-FORWARDED-for", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2"), ("via", "1.1 squid"))
    Masking("delete").apply(h, client="127.0.0.2")
    assert list(h.items()) == []


def test_truncate_keeps_only_the_client_address_in_x_forwarded_for() -> None:
    h = headers(*NEUTRAL, ("X-Forwarded-For", "6.6.6.6, 7.7.7.7"), ("X-Real-IP", "6.6.6.6"), *PROXY)
    Masking("truncate").apply(h, client="127.0.0.2")
    assert h.get_all("X-Forwarded-For") == ["127.0.0.2"]
    assert "X-Real-IP" not in h and "Proxy-Authorization" not in h


def test_transparent_passes_identity_headers_but_never_proxy_credentials() -> None:
    h = headers(*NEUTRAL, *IDENTITY, *PROXY)
    Masking("transparent").apply(h, client="127.0.0.2")
    assert list(h.items()) == NEUTRAL + IDENTITY


@pytest.mark.parametrize("mode", ["delete", "truncate", "transparent"])
def test_extra_headers_and_a_forged_pseudonym_go_in_every_mode(mode: str) -> None:
    h = headers(*NEUTRAL, ("X-Device-Id", "laptop-42"), ("x-client-pseudonym", "c-forged"))
    Masking(mode, extra=("X-Device-Id",), pseudonym_header="X-Client-Pseudonym").apply(h, client="10.0.0.1")
    assert "X-Device-Id" not in h and "X-Client-Pseudonym" not in h


def test_only_delete_hides_clients() -> None:
    assert Masking("delete").hides_clients
    assert not Masking("truncate").hides_clients
    assert not Masking("transparent").hides_clients


def test_unknown_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="forwarded_for"):
        Masking("on")


def test_docstring_examples() -> None:
    assert doctest.testmod(masking).failed == 0
