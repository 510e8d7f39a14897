"""The cache core on mitmproxy's own connections, through a real `forward-proxy run` and real loopback
upstreams: each test names a defect of the former core (a private HTTP client beside mitmproxy, two
engines, header lists read into a dict) and shows it is gone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Received, Reply, Upstream, self_signed_certificate

pytestmark = pytest.mark.integration


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream(model_version="v1") as server:
        yield server


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[RunningProxy]:
    with start_proxy(tmp_path, "--set", "version_check_interval=1s") as running:
        yield running


def post(
    session: requests.Session, url: str, body: Any, headers: dict[str, str] | None = None
) -> requests.Response:
    return session.post(url, json=body, headers=headers or {}, timeout=30)


def openai_embeddings(received: Received) -> bytes:
    """How OpenAI, vLLM or TEI answer: a vector per input and the batch's usage, no X-Input-Tokens."""
    inputs = json.loads(received.body)["input"]
    inputs = [inputs] if isinstance(inputs, str) else inputs
    data = [
        {"object": "embedding", "index": i, "embedding": [len(text) / 10, 0.5]}
        for i, text in enumerate(inputs)
    ]
    tokens = sum(len(text.split()) + 1 for text in inputs)
    return json.dumps(
        {
            "object": "list",
            "data": data,
            "model": "m",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    ).encode()


def test_private_on_one_of_two_cache_control_lines_is_never_stored(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    """What nginx's `add_header` in front of an app sends: the second line must not hide the first."""
    path = "/v2/models/private/infer"
    upstream.reply(path, Reply(header_lines=[("Cache-Control", "private"), ("Cache-Control", "max-age=600")]))
    with proxy.session() as session:
        answers = [post(session, upstream.url(path), {"inputs": [], "id": "x"}) for _ in range(2)]
    assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "MISS"]
    assert upstream.calls(path) == 2


def test_a_waiter_is_not_given_an_answer_that_may_not_be_stored(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    path = "/v2/models/mine/infer"
    upstream.reply(path, Reply(delay=0.5, headers={"Cache-Control": "private"}))

    def ask(_: int) -> requests.Response:
        with proxy.session() as session:
            return post(session, upstream.url(path), {"inputs": [], "id": "same"})

    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(ask, range(3)))
    assert upstream.calls(path) == 3
    assert sorted(answer.json()["call"] for answer in answers) == [1, 2, 3]  # each its own answer


def test_a_waiter_that_sent_another_value_of_a_vary_header_asks_itself(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    path = "/v2/models/varies/infer"
    upstream.reply(path, Reply(delay=0.5, headers={"Vary": "Accept-Language"}))

    def ask(language: str) -> requests.Response:
        with proxy.session() as session:
            return post(session, upstream.url(path), {"inputs": [], "id": "v"}, {"Accept-Language": language})

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(ask, ["de", "fr"]))
    assert upstream.calls(path) == 2
    assert {answer.json()["call"] for answer in answers} == {1, 2}


def test_rows_of_an_upstream_without_input_tokens_are_stored_and_asked_together(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    upstream.reply("/v1/embeddings", Reply(body=openai_embeddings, model_version=None))
    url = upstream.url("/v1/embeddings")
    batch = {"input": ["one", "two words", "three more words"], "model": "m"}
    with proxy.session() as session:
        first, second = post(session, url, batch), post(session, url, batch)
        texts = [f"new text number {index}" for index in range(200)]
        wide = post(session, url, {"input": ["one", *texts, "two words"], "model": "m"})
    assert (first.headers["X-Cache"], first.headers["X-Cache-Rows"]) == ("MISS", "0/3")
    assert (second.headers["X-Cache"], second.headers["X-Cache-Rows"]) == ("HIT", "3/3")
    assert second.json()["data"] == first.json()["data"]
    assert second.json()["usage"] == first.json()["usage"]  # the shares add up to the upstream's total
    assert second.headers["X-Cache-Usage"] == "estimated"
    assert (wide.headers["X-Cache"], wide.headers["X-Cache-Rows"]) == ("PARTIAL", "2/202")
    assert upstream.calls("/v1/embeddings") == 2  # 200 new texts: one upstream request, not 200
    assert json.loads(upstream.received("/v1/embeddings")[-1].body)["input"] == texts
    assert [item["index"] for item in wide.json()["data"]] == list(range(202))


def test_versions_are_per_service_behind_one_address(proxy: RunningProxy, upstream: Upstream) -> None:
    """Two name-based services (an ingress routing by Host) on one address, each with its version."""
    upstream.host_versions.update({"a.models.test": "a1", "b.models.test": "b1"})
    path = "/v2/models/m/infer"
    with proxy.session() as session:

        def ask(service: str) -> requests.Response:
            return post(session, upstream.url(path), {"inputs": [], "id": "x"}, {"Host": service})

        alternating = [ask(service).headers["X-Cache"] for service in ["a.models.test", "b.models.test"] * 4]
        assert alternating == ["MISS", "MISS"] + ["HIT"] * 6
        upstream.host_versions["a.models.test"] = "a2"  # service a is redeployed
        time.sleep(1.2)  # version_check_interval=1s: the next hit re-checks a's version, with a's Host
        after = [ask("a.models.test"), ask("b.models.test")]
    assert [answer.headers["X-Cache"] for answer in after] == ["MISS", "HIT"]
    assert after[0].headers["X-Model-Version"] == "a2"
    checks = [r for r in upstream.received("/v2/health/live")]
    assert checks and all(r.header("Host") in ("a.models.test", "b.models.test") for r in checks)


def test_repeated_query_parameters_keep_their_order(proxy: RunningProxy, upstream: Upstream) -> None:
    path = "/v2/models/q/infer"
    with proxy.session() as session:
        post(session, upstream.url(path) + "?x=1&x=2", {"inputs": []})
        other = post(session, upstream.url(path) + "?x=2&x=1", {"inputs": []})
    assert other.headers["X-Cache"] == "MISS"
    assert [r.path for r in upstream.received(path)] == [path + "?x=1&x=2", path + "?x=2&x=1"]


def test_a_200_whose_body_is_an_error_is_not_stored(proxy: RunningProxy, upstream: Upstream) -> None:
    upstream.reply("/v1/embeddings", Reply(body=b'{"error": {"message": "rate limited", "type": "quota"}}'))
    with proxy.session() as session:
        answers = [
            post(session, upstream.url("/v1/embeddings"), {"input": "x", "model": "m"}) for _ in range(2)
        ]
    assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "MISS"]
    assert upstream.calls("/v1/embeddings") == 2


def test_a_hit_keeps_the_reason_phrase(proxy: RunningProxy, upstream: Upstream) -> None:
    with proxy.session() as session:
        answers = [post(session, upstream.url("/v2/models/r/infer"), {"inputs": []}) for _ in range(2)]
    assert answers[1].headers["X-Cache"] == "HIT" and answers[1].reason == "OK"


def test_a_large_upstream_header_block_passes_on_a_cached_route(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    """About 320 KiB of answer headers (the model API's X-Input-Tokens of a very large batch)."""
    lines = [(f"X-Large-{index}", "t" * 8000) for index in range(40)]
    upstream.reply("/v2/models/big/infer", Reply(header_lines=lines))
    with proxy.session() as session:
        answer = post(session, upstream.url("/v2/models/big/infer"), {"inputs": []})
    assert answer.status_code == 200 and answer.headers["X-Large-39"] == "t" * 8000


@pytest.mark.parametrize("directive", ["no-store", None])
def test_a_request_to_the_proxy_itself_is_refused_promptly(
    proxy: RunningProxy, directive: str | None
) -> None:
    headers = {"Cache-Control": directive} if directive else {}
    started = time.monotonic()
    with proxy.session() as session:
        answer = post(session, proxy.url + "/v1/embeddings", {"input": "loop", "model": "m"}, headers)
    assert time.monotonic() - started < 5
    assert answer.status_code >= 400 and answer.headers["Content-Type"] == "application/json"


def test_a_private_ca_and_a_client_certificate_hold_on_cached_routes(tmp_path: Path) -> None:
    """mitmproxy's upstream TLS options (trusted CA, client certificate) apply to the cache's routes."""
    server_pem = self_signed_certificate(tmp_path / "server")
    client_pem = self_signed_certificate(tmp_path / "client", names=("forward-proxy",))
    with Upstream(certificate=server_pem, client_ca=client_pem) as secure:
        args = (
            "--set",
            f"mode=reverse:https://127.0.0.1:{secure.port}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={server_pem}",
            "--set",
            f"client_certs={client_pem}",
        )
        with start_proxy(tmp_path, *args) as proxy, requests.Session() as session:
            session.trust_env = False
            url = proxy.url + "/v2/models/tls/infer"
            answers = [session.post(url, json={"inputs": []}, timeout=30) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [200, 200]
    assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "HIT"]
    assert secure.calls("/v2/models/tls/infer") == 1
