"""Cache poisoning and tenant isolation through a real `forward-proxy run`: requests that differ in Host,
credentials, namespace or a varying header never share an entry; absolute-form and origin-form
targets, duplicate headers and header case cannot point one request at another's entry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from forward_proxy.cache.policy import unstorable_reason
from tests.reliability.rawclient import RawResponse, request_bytes, send_raw
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Received, Reply, Upstream

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PATH = "/v1/embeddings"
WHO = "/v2/models/who/infer"  # answers with the request headers that identify the caller


def who_answered(received: Received) -> bytes:
    """An answer that names what it was computed for: upstream, call, credentials, language, Host."""
    return json.dumps(
        {
            "call": received.call,
            "authorization": received.header("authorization"),
            "tenant": received.header("x-tenant"),
            "lang": received.header("x-lang"),
            "other": received.header("x-other"),
            "host": received.header("host"),
        }
    ).encode()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream(model_version="a1") as server:
        server.reply(WHO, Reply(body=who_answered))
        yield server


@pytest.fixture(scope="module")
def other() -> Iterator[Upstream]:
    with Upstream(model_version="b1") as server:
        server.reply(WHO, Reply(body=who_answered))
        yield server


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    with start_proxy(
        tmp_path_factory.mktemp("poisoning"),
        "--set",
        "cache_vary_headers=X-Lang",
        "--set",
        "cache_partition_headers=X-Tenant",
    ) as running:
        yield running


def hostport(server: Upstream) -> str:
    return f"{server.host}:{server.port}"


def send(
    proxy: RunningProxy,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes = b'{"input": "poison?"}',
) -> RawResponse:
    """POST `target` (absolute-form URL or origin-form path) with exactly these headers, on a raw socket."""
    answer = send_raw(proxy.host, proxy.port, request_bytes("POST", target, headers, body))
    assert answer.status == 200, answer.body[:300]
    return answer


def json_headers(server: Upstream, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Host", hostport(server)), ("Content-Type", "application/json"), *extra]


# --- requests that differ in what changes the answer ------------------------------------------------


def variants(upstream: Upstream, other: Upstream) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Requests with the same body that must each have an entry of their own."""
    a = upstream.url(PATH)
    return {
        "plain": (a, json_headers(upstream)),
        "another upstream": (other.url(PATH), json_headers(other)),
        "absolute-form with the Host of another upstream": (
            a,
            [("Host", hostport(other)), ("Content-Type", "application/json")],
        ),
        "credentials a": (a, json_headers(upstream, ("Authorization", "Bearer a"))),
        "credentials b": (a, json_headers(upstream, ("Authorization", "Bearer b"))),
        "credentials a and b": (
            a,
            json_headers(upstream, ("Authorization", "Bearer a"), ("Authorization", "Bearer b")),
        ),
        "api key": (a, json_headers(upstream, ("X-Api-Key", "k1"))),
        "configured partition header": (a, json_headers(upstream, ("X-Tenant", "t1"))),
        "namespace": (a, json_headers(upstream, ("X-Cache-Namespace", "ns1"))),
        "two namespaces": (
            a,
            json_headers(upstream, ("X-Cache-Namespace", "ns1"), ("X-Cache-Namespace", "ns2")),
        ),
        "configured vary header": (a, json_headers(upstream, ("X-Lang", "de"))),
        "Accept": (a, json_headers(upstream, ("Accept", "text/csv"))),
        "Content-Type": (a, [("Host", hostport(upstream)), ("Content-Type", "application/vnd.x+json")]),
        "query": (a + "?dimensions=8", json_headers(upstream)),
        "host name": (f"http://localhost:{upstream.port}{PATH}", [("Host", f"localhost:{upstream.port}")]),
    }


def test_requests_that_differ_in_what_changes_the_answer_never_share_an_entry(
    proxy: RunningProxy, upstream: Upstream, other: Upstream
) -> None:
    table = variants(upstream, other)
    calls = upstream.calls(PATH) + other.calls(PATH)
    first = {name: send(proxy, target, headers) for name, (target, headers) in table.items()}
    assert {name: answer.header("X-Cache") for name, answer in first.items()} == dict.fromkeys(table, "MISS")
    assert upstream.calls(PATH) + other.calls(PATH) == calls + len(table)
    assert len({answer.header("X-Cache-Key") for answer in first.values()}) == len(table)
    for name, (target, headers) in table.items():  # each variant now hits its own entry, no other's
        again = send(proxy, target, headers)
        assert again.header("X-Cache") == "HIT", name
        assert again.body == first[name].body, name
    assert upstream.calls(PATH) + other.calls(PATH) == calls + len(table)


def test_an_absolute_form_target_cannot_plant_an_answer_for_the_host_it_names(
    proxy: RunningProxy, upstream: Upstream, other: Upstream
) -> None:
    """`POST http://A/... Host: B` is answered by A; it must never be served to `POST /... Host: B`."""
    body = b'{"input": "planted"}'
    planted = send(proxy, upstream.url(WHO), json_headers(other), body)
    assert planted.header("X-Cache") == "MISS" and planted.json()["host"] == hostport(other)
    other_calls = other.calls(WHO)
    victim = send(proxy, WHO, json_headers(other), body)  # origin-form: the proxy goes to B
    assert victim.header("X-Cache") == "MISS" and other.calls(WHO) == other_calls + 1
    assert victim.header("X-Cache-Key") != planted.header("X-Cache-Key")
    # ... and the other way round: B's stored answer is not served to the absolute-form request for A.
    assert send(proxy, upstream.url(WHO), json_headers(other), body).body == planted.body
    assert send(proxy, WHO, json_headers(other), body).body == victim.body


def test_header_name_case_is_one_header_but_duplicates_are_not_one_value(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    body = b'{"input": "case"}'
    target = upstream.url(WHO)
    lower = send(proxy, target, [("host", hostport(upstream)), ("authorization", "Bearer c")], body)
    upper = send(proxy, target, [("HOST", hostport(upstream)), ("AUTHORIZATION", "Bearer c")], body)
    assert (lower.header("X-Cache"), upper.header("X-Cache")) == ("MISS", "HIT")  # same request
    assert lower.json()["authorization"] == "Bearer c"
    both = send(
        proxy,
        target,
        [("Host", hostport(upstream)), ("Authorization", "Bearer c"), ("Authorization", "Bearer d")],
        body,
    )
    alone = send(proxy, target, [("Host", hostport(upstream)), ("Authorization", "Bearer d")], body)
    assert both.header("X-Cache") == alone.header("X-Cache") == "MISS"
    assert len({lower.header("X-Cache-Key"), both.header("X-Cache-Key"), alone.header("X-Cache-Key")}) == 3


def test_a_client_cannot_name_the_entry_it_wants(proxy: RunningProxy, upstream: Upstream) -> None:
    """X-Cache and X-Cache-Key are answer headers; sent by a client they select nothing."""
    body = b'{"input": "choose"}'
    owner = send(proxy, upstream.url(WHO), json_headers(upstream, ("Authorization", "Bearer owner")), body)
    forged = json_headers(
        upstream,
        ("X-Cache-Key", owner.header("X-Cache-Key") or ""),
        ("X-Cache", "HIT"),
        ("Cache-Control", "only-if-cached"),
    )
    answer = send_raw(proxy.host, proxy.port, request_bytes("POST", upstream.url(WHO), forged, body))
    assert answer.status == 504 and answer.json()["error"]["code"] == "not_cached"


def test_origin_form_and_absolute_form_of_one_request_share_its_entry(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    body = b'{"input": "one request, two forms"}'
    absolute = send(proxy, upstream.url(PATH), json_headers(upstream), body)
    origin = send(proxy, PATH, json_headers(upstream), body)
    assert (absolute.header("X-Cache"), origin.header("X-Cache")) == ("MISS", "HIT")
    assert origin.body == absolute.body


def test_json_objects_that_repeat_a_name_share_no_entry(proxy: RunningProxy, upstream: Upstream) -> None:
    """Regression: `{"input": "a", "input": "b"}` was keyed as `{"input": "b"}` (Python keeps the last
    name); an upstream whose parser keeps the first would have stored the answer for "a" under the key of
    "b". Such bodies are now keyed by their bytes."""
    target = upstream.url(PATH)
    ambiguous = send(proxy, target, json_headers(upstream), b'{"input": "a", "input": "b"}')
    plain = send(proxy, target, json_headers(upstream), b'{"input": "b"}')
    assert ambiguous.header("X-Cache") == plain.header("X-Cache") == "MISS"
    assert ambiguous.header("X-Cache-Key") != plain.header("X-Cache-Key")


# --- answers that vary ------------------------------------------------------------------------------


def test_an_answer_varying_on_a_header_outside_the_key_is_not_stored(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    """Regression: `Vary: X-Other` was ignored, so the answer for X-Other: 1 was served for X-Other: 2."""
    path = "/v2/models/varying/infer"
    upstream.reply(path, Reply(body=who_answered, headers={"Vary": "X-Other"}))
    body = b'{"input": "vary"}'
    one = send(proxy, upstream.url(path), json_headers(upstream, ("X-Other", "1")), body)
    two = send(proxy, upstream.url(path), json_headers(upstream, ("X-Other", "2")), body)
    assert (one.json()["other"], two.json()["other"]) == ("1", "2")
    assert one.header("X-Cache") == two.header("X-Cache") == "MISS"


def test_an_answer_varying_on_a_keyed_header_is_stored_per_value(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    path = "/v2/models/languages/infer"
    upstream.reply(path, Reply(body=who_answered, headers={"Vary": "X-Lang, Accept, Authorization"}))
    body = b'{"input": "lang"}'
    answers = [
        send(proxy, upstream.url(path), json_headers(upstream, ("X-Lang", lang)), body)
        for lang in ("de", "fr", "de", "fr")
    ]
    assert [answer.header("X-Cache") for answer in answers] == ["MISS", "MISS", "HIT", "HIT"]
    assert [answer.json()["lang"] for answer in answers] == ["de", "fr", "de", "fr"]


@pytest.mark.parametrize(
    ("vary", "keyed", "stored"),
    [
        ("", (), True),
        ("Accept, Content-Type", (), True),
        ("authorization", (), True),
        ("Accept-Language", (), False),
        ("Accept-Encoding", (), False),
        ("X-Lang", ("x-lang",), True),
        ("accept, X-Lang", ("x-lang",), True),
        ("X-Lang, X-Other", ("x-lang",), False),
        ("*", (), False),
        ("accept, *", (), False),
    ],
)
def test_vary_storability(vary: str, keyed: tuple[str, ...], stored: bool) -> None:
    from forward_proxy.cache.keys import KEY_HEADERS, PARTITION_HEADERS

    headers = {"vary": vary} if vary else {}
    reason = unstorable_reason(200, headers, 10, {200}, 100, (*KEY_HEADERS, *PARTITION_HEADERS, *keyed))
    assert (reason is None) == stored, reason


# --- tenants at once --------------------------------------------------------------------------------


def test_tenants_sending_the_same_request_at_once_each_get_their_own_answer(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    """Identical bodies from many tenants in flight together: coalescing and storing never cross them."""
    body = b'{"input": "same for everyone"}'
    tenants = [f"Bearer tenant-{index % 6}" for index in range(48)]

    def ask(token: str) -> tuple[str, Any]:
        answer = send(proxy, upstream.url(WHO), json_headers(upstream, ("Authorization", token)), body)
        return token, answer.json()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, tenants))
    assert all(answered["authorization"] == token for token, answered in answers)
    calls = {token: {answered["call"] for t, answered in answers if t == token} for token in set(tenants)}
    assert all(len(seen) == 1 for seen in calls.values()), calls  # one upstream answer per tenant
