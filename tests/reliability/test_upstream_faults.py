"""Upstream faults through a real `forward-proxy run`: every failure of the model API gives the client a
prompt answer (a JSON 502/504 from the proxy, or the upstream's own 5xx), nothing of it is cached, and
other clients' requests in flight, waiters of a coalesced request included, are answered as before."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.reliability.faults import FORGED, UNASKED_DELAY, Fault, FaultyUpstream, healthy_json
from tests.support.processes import free_port
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Reply, Upstream

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

TIMEOUT = 2.0  # the proxy's upstream_timeout here
PROMPT = TIMEOUT + 4.0  # "prompt": well within the timeout and a few seconds of a loaded 2-core machine

TIMEOUTS = [Fault.HANG, Fault.HANG_AFTER_HEAD, Fault.DRIBBLE]
BROKEN = [
    Fault.CLOSE_BEFORE_ANSWER,
    Fault.RESET,
    Fault.CLOSE_MID_BODY,
    Fault.TRUNCATED_CHUNKED,
    Fault.GARBAGE,
    Fault.BAD_STATUS_LINE,
    Fault.BAD_CONTENT_LENGTH,
]


@pytest.fixture(scope="module")
def faulty() -> Iterator[FaultyUpstream]:
    with FaultyUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def healthy() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    work = tmp_path_factory.mktemp("proxy")
    with start_proxy(work, "--set", f"upstream_timeout={TIMEOUT:g}s") as running:
        yield running


def post(proxy: RunningProxy, url: str, body: Any) -> requests.Response:
    with proxy.session() as session:
        return session.post(url, json=body, timeout=TIMEOUT + 30)


def route(kind: str, fault: Fault) -> tuple[str, dict[str, Any]]:
    """A cached route and a body: answered whole (a KServe request that is no batch), or row by row (an
    OpenAI embeddings batch, the per-item cache). Each test gets texts of its own."""
    if kind == "whole":
        return f"/v2/models/{fault.name.lower()}/infer", {"inputs": [], "id": fault.name}
    return "/v1/embeddings", {"input": [f"{fault.name} one", f"{fault.name} two words"], "model": "m"}


def assert_proxy_error(answer: requests.Response, status: int, code: str, origin: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["upstream"] == origin
    assert origin.removeprefix("http://") in error["message"] and error["cause"] in error["message"]
    assert answer.headers["X-Cache"] == "MISS"  # never a HIT: nothing was stored


def assert_recovers(proxy: RunningProxy, faulty: FaultyUpstream, path: str, body: dict[str, Any]) -> None:
    """Once the upstream is well again, the same request gets its real answer, which is then cached."""
    faulty.behave(path, None)
    calls = faulty.calls(path)
    fresh = post(proxy, faulty.url(path), body)
    assert fresh.status_code == 200 and fresh.headers["X-Cache"] == "MISS"
    assert fresh.json() == healthy_json(path, body)
    again = post(proxy, faulty.url(path), body)
    assert again.headers["X-Cache"] == "HIT" and again.json() == healthy_json(path, body)
    assert faulty.calls(path) > calls


@pytest.mark.parametrize("kind", ["whole", "rows"])
@pytest.mark.parametrize("fault", TIMEOUTS + BROKEN, ids=lambda fault: fault.name.lower())
def test_a_failing_upstream_gives_a_prompt_json_error_and_nothing_is_cached(
    proxy: RunningProxy, faulty: FaultyUpstream, fault: Fault, kind: str
) -> None:
    path, body = route(kind, fault)
    faulty.behave(path, fault)
    status, code = (504, "upstream_timeout") if fault in TIMEOUTS else (502, "upstream_failed")
    for _ in range(2):  # the second one goes upstream again: the failure was not cached
        calls = faulty.calls(path)
        started = time.monotonic()
        answer = post(proxy, faulty.url(path), body)
        assert time.monotonic() - started < PROMPT
        assert_proxy_error(answer, status, code, faulty.origin)
        assert faulty.calls(path) > calls
    assert_recovers(proxy, faulty, path, body)


@pytest.mark.parametrize("kind", ["whole", "rows"])
def test_a_5xx_page_that_is_not_json_becomes_a_json_502_and_is_not_cached(
    proxy: RunningProxy, faulty: FaultyUpstream, kind: str
) -> None:
    path, body = route(kind, Fault.HTTP_503_HTML)
    faulty.behave(path, Fault.HTTP_503_HTML)
    for _ in range(2):
        calls = faulty.calls(path)
        answer = post(proxy, faulty.url(path), body)
        assert_proxy_error(answer, 502, "upstream_error", faulty.origin)
        assert (
            answer.json()["error"]["upstream_status"] == 503
            and "text/html" in answer.json()["error"]["cause"]
        )
        assert faulty.calls(path) > calls
    assert_recovers(proxy, faulty, path, body)


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [], "id": "not a batch"},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]},
    ],
    ids=["whole", "kserve-batch"],
)
def test_a_model_api_hung_as_a_whole_waits_no_step_longer_than_the_timeout(
    proxy: RunningProxy, body: dict[str, Any]
) -> None:
    """Every path hangs, so the steps before the call hang too: the version check of a new origin, and
    for a KServe batch the model metadata question. Regression: that question waited 5s whatever the
    upstream_timeout, so a batch got its 504 after timeout + 5s + the version check."""
    steps = 3 if "datatype" in json.dumps(body) else 2  # version check, (metadata,) the call itself
    with FaultyUpstream() as hung:
        hung.behave("*", Fault.HANG)
        started = time.monotonic()
        answer = post(proxy, hung.url("/v2/models/hung/infer"), body)
        elapsed = time.monotonic() - started
    assert_proxy_error(answer, 504, "upstream_timeout", hung.origin)
    assert elapsed < steps * TIMEOUT + 2, f"answered after {elapsed:.1f}s"


@pytest.mark.parametrize("kind", ["whole", "rows"])
def test_a_json_answer_that_does_not_parse_is_passed_on_and_not_cached(
    proxy: RunningProxy, faulty: FaultyUpstream, kind: str
) -> None:
    """A well-framed 200 whose JSON body is cut short: the proxy cannot know better than to pass it on,
    but storing it would serve the broken answer for the whole TTL after the upstream recovered."""
    path, body = route(kind, Fault.INVALID_JSON)
    faulty.behave(path, Fault.INVALID_JSON)
    for _ in range(2):
        calls = faulty.calls(path)
        answer = post(proxy, faulty.url(path), body)
        assert answer.status_code == 200 and answer.headers["X-Cache"] == "MISS"
        with pytest.raises(ValueError):
            answer.json()
        assert faulty.calls(path) > calls
    assert_recovers(proxy, faulty, path, body)


def test_a_5xx_json_error_of_the_model_api_is_passed_on_and_not_cached(
    proxy: RunningProxy, healthy: Upstream
) -> None:
    error = b'{"error": {"code": "model_failed", "message": "CUDA out of memory"}}'
    healthy.reply("/v2/models/oom/infer", Reply(status=500, body=error))
    url = healthy.url("/v2/models/oom/infer")
    answers = [post(proxy, url, {"inputs": []}) for _ in range(2)]
    assert [(answer.status_code, answer.content) for answer in answers] == [(500, error)] * 2
    assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "MISS"]
    assert healthy.calls("/v2/models/oom/infer") == 2


def test_connection_refused_gives_a_json_502_and_is_not_cached(proxy: RunningProxy) -> None:
    origin = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for _ in range(2):
        started = time.monotonic()
        answer = post(proxy, origin + "/v1/embeddings", {"input": ["refused"]})
        assert time.monotonic() - started < PROMPT
        assert_proxy_error(answer, 502, "upstream_unreachable", origin)
        assert "refused" in answer.json()["error"]["cause"].lower()


def test_a_host_name_that_does_not_resolve_gives_a_json_502(proxy: RunningProxy) -> None:
    # .invalid never resolves (RFC 6761): one question to the system resolver, answered "no such name".
    host = "model-api.nowhere.invalid"
    started = time.monotonic()
    answer = post(proxy, f"http://{host}:8000/v1/embeddings", {"input": ["unresolvable"]})
    assert time.monotonic() - started < 30  # generous: a resolver that does not answer times out itself
    assert answer.status_code == 502
    assert answer.headers["Content-Type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == "upstream_unresolvable" and error["host"] == host
    assert host in error["message"]


@pytest.mark.parametrize("fault", [Fault.OVERLONG_BODY, Fault.UNASKED_ANSWER], ids=["overlong", "unasked"])
def test_bytes_after_an_answer_never_answer_the_next_request(
    proxy: RunningProxy, faulty: FaultyUpstream, fault: Fault
) -> None:
    """Bytes after an answer's announced end (a forged second answer, sent with it or a moment later)
    stay on the pooled keep-alive connection; the next request over it must not take them for its
    answer, nor cache them under its key."""
    path = f"/v2/models/{fault.name.lower()}/infer"
    faulty.behave(path, fault)
    first = post(proxy, faulty.url(path), {"inputs": [], "id": "first"})
    assert first.status_code == 200 and first.json() == healthy_json(path, {"inputs": [], "id": "first"})
    time.sleep(UNASKED_DELAY * 3)  # the forged answer is on the idle connection by now
    for index in range(3):  # whichever pooled connection the next requests get
        path, body = "/v2/models/next/infer", {"inputs": [], "id": f"{fault.name} {index}"}
        answer = post(proxy, faulty.url(path), body)
        assert answer.content != FORGED
        assert answer.status_code == 200 and answer.json() == healthy_json(path, body)
        again = post(proxy, faulty.url(path), body)
        assert again.headers["X-Cache"] == "HIT" and again.json() == healthy_json(path, body)


def test_coalesced_waiters_share_the_failure_promptly_and_others_are_not_disturbed(
    proxy: RunningProxy, faulty: FaultyUpstream, healthy: Upstream
) -> None:
    """12 identical requests to a hanging upstream coalesce into one call and all get the 504 within the
    timeout; meanwhile 12 identical requests to a slow but healthy upstream coalesce and all get its
    answer, and other clients' distinct requests are answered, each its own."""
    hanging_path, hanging_body = "/v2/models/stuck/infer", {"inputs": [], "id": "stuck"}
    faulty.behave(hanging_path, Fault.HANG)
    healthy.reply("/v2/models/slow/infer", Reply(delay=1.0))
    start = threading.Barrier(36)

    def stuck(_: int) -> tuple[requests.Response, float]:
        start.wait(timeout=30)
        started = time.monotonic()
        return post(proxy, faulty.url(hanging_path), hanging_body), time.monotonic() - started

    def slow(_: int) -> requests.Response:
        start.wait(timeout=30)
        return post(proxy, healthy.url("/v2/models/slow/infer"), {"inputs": [], "id": "slow"})

    def other(index: int) -> requests.Response:
        start.wait(timeout=30)
        return post(proxy, healthy.url(f"/v2/models/other{index}/infer"), {"inputs": [], "id": index})

    with ThreadPoolExecutor(max_workers=36) as pool:
        stuck_answers = [pool.submit(stuck, index) for index in range(12)]
        slow_answers = [pool.submit(slow, index) for index in range(12)]
        other_answers = [pool.submit(other, index) for index in range(12)]
        stuck_results = [future.result() for future in stuck_answers]
        slow_results = [future.result() for future in slow_answers]
        other_results = [future.result() for future in other_answers]

    assert faulty.calls(hanging_path) == 1
    for answer, elapsed in stuck_results:
        assert elapsed < PROMPT
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "upstream_timeout"
    assert {answer.headers["X-Cache"] for answer, _ in stuck_results} <= {"MISS", "COALESCED"}

    assert healthy.calls("/v2/models/slow/infer") == 1
    assert all(answer.status_code == 200 for answer in slow_results)
    assert len({answer.content for answer in slow_results}) == 1
    assert {answer.headers["X-Cache"] for answer in slow_results} <= {"MISS", "COALESCED", "HIT"}

    for index, answer in enumerate(other_results):
        assert answer.status_code == 200 and answer.json()["body"]["id"] == index


def test_a_waiter_is_answered_when_the_leading_client_goes_away(
    proxy: RunningProxy, healthy: Upstream
) -> None:
    """The client whose request leads a coalesced call disconnects, which ends its exchange (mitmproxy
    carries it); one of the waiters asks again for all of them."""
    path = "/v2/models/abandoned/infer"
    healthy.reply(path, Reply(delay=1.5))
    body = {"inputs": [], "id": "abandoned"}
    calls = healthy.calls(path)

    def lead() -> None:
        with proxy.session() as session:
            session.post(healthy.url(path), json=body, timeout=0.5)  # gives up (closes) before the answer

    with ThreadPoolExecutor(max_workers=4) as pool:
        leading = pool.submit(lead)
        deadline = time.monotonic() + 10
        while healthy.calls(path) == calls and time.monotonic() < deadline:
            time.sleep(0.01)
        waiters = [pool.submit(post, proxy, healthy.url(path), body) for _ in range(3)]
        results = [future.result() for future in waiters]
        with pytest.raises(requests.exceptions.ReadTimeout):
            leading.result()
    assert healthy.calls(path) == calls + 2
    assert all(answer.status_code == 200 for answer in results)
    decisions = [answer.headers["X-Cache"] for answer in results]
    assert decisions.count("MISS") == 1 and set(decisions) <= {"MISS", "COALESCED", "HIT"}
    assert len({answer.content for answer in results}) == 1


def test_the_proxy_serves_on_after_every_fault(proxy: RunningProxy, healthy: Upstream) -> None:
    """After all the faults above (this module's proxy saw them all), it still caches and answers."""
    url = healthy.url("/v1/embeddings")
    body = {"input": "still here"}
    first, second = post(proxy, url, body), post(proxy, url, body)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.headers["X-Cache"] == "HIT" and second.content == first.content
    assert proxy.process.proc is not None and proxy.process.proc.poll() is None
    assert "Traceback" not in proxy.log()
