"""Bad input from clients, sent on raw sockets to a real `forward-proxy run` in front of a recording
upstream: each gets a clear 4xx or a closed connection, nothing wrong reaches the upstream or the cache,
and the proxy serves well-behaved clients meanwhile (checked after every test)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.reliability.rawclient import RawConnection, RawResponse, request_bytes, send_raw
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Reply, Upstream

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

CONNECTION_LIMIT = 24
BODY_LIMIT = 1024 * 1024
EMBEDDINGS = "/v1/embeddings"  # a cached route (the default rules)
PLAIN = "/plain"  # a route no rule matches: mitmproxy forwards it itself
JSON = ("Content-Type", "application/json")


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream(model_version="v1") as server:
        yield server


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    work = tmp_path_factory.mktemp("bad-input")
    with start_proxy(
        work,
        "--set",
        f"max_client_connections={CONNECTION_LIMIT}",
        "--set",
        f"body_size_limit={BODY_LIMIT}",
    ) as running:
        yield running


@pytest.fixture(autouse=True)
def still_serving(proxy: RunningProxy, upstream: Upstream) -> Iterator[None]:
    """After every test: the process is alive and a well-behaved client gets a cached answer."""
    yield
    assert proxy.process.proc is not None and proxy.process.proc.poll() is None, proxy.log()[-3000:]
    well_behaved(proxy, upstream, "still serving")


def hostport(upstream: Upstream) -> str:
    return f"{upstream.host}:{upstream.port}"


def requests_received(upstream: Upstream) -> int:
    """Calls the upstream got for clients (not the cache's own version checks)."""
    return upstream.calls() - upstream.calls("/v2/health/live")


def well_behaved(proxy: RunningProxy, upstream: Upstream, text: str) -> requests.Response:
    with proxy.session() as session:
        first = session.post(upstream.url(EMBEDDINGS), json={"input": text}, timeout=30)
        second = session.post(upstream.url(EMBEDDINGS), json={"input": text}, timeout=30)
    assert first.status_code == second.status_code == 200, first.text
    assert second.headers["X-Cache"] == "HIT" and second.content == first.content
    return first


def embeddings_request(upstream: Upstream, body: bytes, *headers: tuple[str, str]) -> bytes:
    return request_bytes(
        "POST", upstream.url(EMBEDDINGS), [("Host", hostport(upstream)), JSON, *headers], body
    )


def assert_refused(answer: RawResponse, status: int = 400) -> None:
    """A clear refusal: the status and the connection closed (or `Connection: close`: after a 413 mitmproxy
    leaves the connection for the client to close), or a connection closed without an answer."""
    if answer.status is None:
        assert answer.closed
    else:
        assert answer.status == status, (answer.status, answer.body[:300])
        closing = answer.closed or (answer.header("Connection") or "").lower() == "close"
        assert closing, "the proxy kept a connection whose framing it could not trust"
        assert answer.header("Content-Type") == "application/json", answer.headers
        error = answer.json()["error"]  # the one error shape, also for mitmproxy's own refusals
        assert error["code"] and error["message"], error


# --- malformed request lines and headers ------------------------------------------------------------


MALFORMED = {
    "not http": b"HELLO\r\n\r\n",
    "request line without target": b"GET\r\n\r\n",
    "request line with spaces in the target": b"GET /a b c HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "binary garbage": bytes(range(256)) + b"\r\n\r\n",
    "header without colon": b"GET {origin}/x HTTP/1.1\r\nHost: {host}\r\nNoColon\r\n\r\n",
    "space before the colon (smuggling)": b"GET {origin}/x HTTP/1.1\r\nHost : {host}\r\n\r\n",
    "origin-form without Host": b"GET /x HTTP/1.1\r\n\r\n",
    "origin-form with two Host headers": b"GET /x HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n",
    "userinfo in the target": b"POST http://user@{host}/v1/embeddings HTTP/1.1\r\nHost: {host}\r\n\r\n",
    "negative Content-Length": b"POST {origin}/v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Length: -5\r\n\r\n",
    "non-numeric Content-Length": b"POST {origin}/v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Length: ab\r\n\r\n",
    "two different Content-Lengths": (
        b"POST {origin}/v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x"
    ),
    "Content-Length and Transfer-Encoding (smuggling)": (
        b"POST {origin}/v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "invalid chunk size": (
        b"POST {origin}/v1/embeddings HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_400_and_a_closed_connection(
    proxy: RunningProxy, upstream: Upstream, raw: bytes
) -> None:
    calls = requests_received(upstream)
    data = raw.replace(b"{origin}", upstream.origin.encode()).replace(b"{host}", hostport(upstream).encode())
    answer = send_raw(proxy.host, proxy.port, data, timeout=10)
    assert_refused(answer)
    assert requests_received(upstream) == calls, "a malformed request reached the upstream"


@pytest.mark.parametrize(
    "header",
    [("X-Bad", "a\x00b"), ("X-Folded", "a\r\n b"), ("Host", "{host}")],
    ids=["NUL in a value", "obsolete line folding", "a second Host header"],
)
def test_odd_headers_get_on_a_cached_route_what_they_get_on_any_route(
    proxy: RunningProxy, upstream: Upstream, header: tuple[str, str]
) -> None:
    """Regression: these reached the cache's own upstream client, whose refusal to send them came back as
    502 `upstream_failed` blaming the upstream. The cache has no client of its own any more: mitmproxy
    carries cached routes as it carries every other, with the same checks (`validate_inbound_headers`),
    so a cached route answers such a request exactly as an uncached one does."""
    name, value = header[0], header[1].replace("{host}", hostport(upstream))
    cached = send_raw(
        proxy.host, proxy.port, embeddings_request(upstream, b'{"input": "odd header"}', (name, value))
    )
    head = (
        f"GET {upstream.url('/uncached')} HTTP/1.1\r\nHost: {hostport(upstream)}\r\n{name}: {value}\r\n\r\n"
    )
    uncached = send_raw(proxy.host, proxy.port, head.encode("latin-1"))
    assert cached.status == uncached.status, (cached.body, uncached.body)
    assert cached.status < 500 and cached.header("X-Cache") in ("MISS", "HIT")


@pytest.mark.parametrize(
    "target",
    [b"/v2/models/\xff/infer", b"/v2/models/\xc3\xa9/infer", b"/v2/models/x/infer?q=\xff"],
    ids=["non-UTF-8 byte in the path", "raw UTF-8 in the path", "non-UTF-8 byte in the query"],
)
def test_raw_non_ascii_targets_are_cached_under_keys_of_their_own(
    proxy: RunningProxy, upstream: Upstream, target: bytes
) -> None:
    """Regression: a non-UTF-8 path byte crashed the cache addon while building the key, and mitmproxy
    forwarded the request itself, uncached and uncounted; once that was fixed, the byte in the model name
    broke the counter store's writes for the whole process. Now such a target is forwarded as sent (by
    mitmproxy) and cached under a key that no other target shares."""
    head = b"POST " + target + f" HTTP/1.1\r\nHost: {hostport(upstream)}\r\n".encode()
    request = head + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    calls = requests_received(upstream)
    first, second = send_raw(proxy.host, proxy.port, request), send_raw(proxy.host, proxy.port, request)
    assert (first.status, first.header("X-Cache")) == (200, "MISS")
    assert (second.status, second.header("X-Cache")) == (200, "HIT")
    assert requests_received(upstream) == calls + 1
    time.sleep(0.5)  # the counters are written every quarter of a second
    assert "counter store failed" not in proxy.log()  # regression: the model name became a bad label


# --- huge headers -------------------------------------------------------------------------------------


def test_a_huge_header_is_refused_by_someone_and_not_cached(proxy: RunningProxy, upstream: Upstream) -> None:
    """mitmproxy has no request head limit of its own; the upstream's (here Python's, 64 KiB a line)
    refuses it, and the refusal is passed on, not stored."""
    body = b'{"input": "huge header"}'
    answer = send_raw(
        proxy.host, proxy.port, embeddings_request(upstream, body, ("X-Big", "a" * 1_000_000)), timeout=30
    )
    # The upstream answers 431 and closes while mitmproxy still sends the head: whether mitmproxy reads
    # the 431 first or sees the connection closed (502 upstream_failed) is a race; either is a refusal.
    assert answer.status in (431, 502) and answer.header("X-Cache") == "MISS"
    normal = send_raw(proxy.host, proxy.port, embeddings_request(upstream, body))
    assert normal.status == 200 and normal.header("X-Cache") == "MISS", "the refusal was cached"


def test_an_unterminated_huge_head_does_not_hurt_the_proxy(proxy: RunningProxy, upstream: Upstream) -> None:
    with RawConnection(proxy.host, proxy.port, timeout=30) as connection:
        connection.send(f"GET {upstream.url(PLAIN)} HTTP/1.1\r\nHost: {hostport(upstream)}\r\n".encode())
        chunk = b"X-Filler: " + b"b" * 65536 + b"\r\n"
        for _ in range(32):  # 2 MiB of head that never ends
            connection.send(chunk)
        well_behaved(proxy, upstream, "while a huge head is pending")
    assert upstream.calls(PLAIN) == 0


def test_many_headers(proxy: RunningProxy, upstream: Upstream) -> None:
    headers = [(f"X-H{i}", "v") for i in range(500)]
    answer = send_raw(proxy.host, proxy.port, embeddings_request(upstream, b'{"input": "many"}', *headers))
    assert answer.status == 431  # Python's upstream allows 100; the proxy passes the refusal on


# --- bodies -------------------------------------------------------------------------------------------


def test_a_body_over_body_size_limit_gets_413_and_never_reaches_the_upstream(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    calls = upstream.calls(EMBEDDINGS)
    big = b'{"input": "' + b"a" * (BODY_LIMIT + 1) + b'"}'
    answer = send_raw(proxy.host, proxy.port, embeddings_request(upstream, big), timeout=30)
    assert_refused(answer, 413)
    chunked = request_bytes(
        "POST",
        upstream.url(EMBEDDINGS),
        [("Host", hostport(upstream)), JSON, ("Transfer-Encoding", "chunked")],
        b"".join(f"{65536:x}\r\n".encode() + b"a" * 65536 + b"\r\n" for _ in range(20)) + b"0\r\n\r\n",
        content_length=False,
    )
    assert_refused(send_raw(proxy.host, proxy.port, chunked, timeout=30), 413)
    assert upstream.calls(EMBEDDINGS) == calls
    under = b'{"input": "' + b"a" * (BODY_LIMIT // 2) + b'"}'
    assert send_raw(proxy.host, proxy.port, embeddings_request(upstream, under), timeout=30).status == 200


def test_content_length_longer_than_the_body_waits_and_sends_nothing(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    calls = upstream.calls(EMBEDDINGS)
    with RawConnection(proxy.host, proxy.port, timeout=10) as connection:
        connection.send(
            embeddings_request(upstream, b'{"input": "short"}', ("Content-Length", "100")).replace(
                b"Content-Length: 18\r\n", b""
            )
        )
        assert connection.read_response(timeout=1.0).status is None  # still waiting for the body
        connection.sock.shutdown(socket.SHUT_WR)  # the client gives up
        assert connection.is_closed_by_peer(timeout=10)
    assert upstream.calls(EMBEDDINGS) == calls


def test_content_length_shorter_than_the_body_leaves_a_garbage_request_that_gets_400(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    body = b'{"input": "longer than said"}\r\n\r\n'
    data = request_bytes(
        "POST", upstream.url(EMBEDDINGS), [("Host", hostport(upstream)), JSON, ("Content-Length", "3")], body
    )
    with RawConnection(proxy.host, proxy.port) as connection:
        connection.send(data)
        first = connection.read_response()
        second = connection.read_response()
    # The first 3 bytes are the request (keyed as the bytes they are); the rest is no request at all.
    assert first.status == 200 and json.loads(first.body)["body"] == '{"i'
    assert_refused(second)


# --- JSON and text that do not parse ------------------------------------------------------------------


def post_raw(proxy: RunningProxy, upstream: Upstream, body: bytes, path: str = EMBEDDINGS) -> RawResponse:
    data = request_bytes("POST", upstream.url(path), [("Host", hostport(upstream)), JSON], body)
    return send_raw(proxy.host, proxy.port, data, timeout=30)


@pytest.mark.parametrize(
    "body",
    [
        b'{"input":',
        b'{"input": "x"}}',
        b"[1, 2,]",
        b'{"input": NaN}',
        b'{"input": "\xff\xfe"}',
        b'{"input": "\\ud800"}',
        b"\xef\xbb\xbf" + b'{"input": "bom"}',
    ],
    ids=["truncated", "trailing brace", "trailing comma", "NaN", "invalid UTF-8", "lone surrogate", "BOM"],
)
def test_bodies_that_are_not_valid_json_are_forwarded_and_keyed_by_their_bytes(
    proxy: RunningProxy, upstream: Upstream, body: bytes
) -> None:
    """Regression (lone surrogate): `{"input": "\\ud800"}` parsed but could not be written back as UTF-8,
    and the cache addon crashed; mitmproxy then forwarded the request uncounted, with no X-Cache."""
    calls = upstream.calls(EMBEDDINGS)
    first, second = post_raw(proxy, upstream, body), post_raw(proxy, upstream, body)
    assert first.status == second.status == 200
    assert (first.header("X-Cache"), second.header("X-Cache")) == ("MISS", "HIT")
    assert second.body == first.body and upstream.calls(EMBEDDINGS) == calls + 1
    received = upstream.received(EMBEDDINGS)[-1].body
    assert received == body, "the proxy changed a body it could not parse"


def test_invalid_utf8_bodies_never_share_an_entry(proxy: RunningProxy, upstream: Upstream) -> None:
    """Bytes that decode to the same text with errors replaced must still be different requests."""
    bodies = [b'{"input": "\xff"}', b'{"input": "\xfe"}', '{"input": "\ufffd"}'.encode()]
    keys = {post_raw(proxy, upstream, body).header("X-Cache-Key") for body in bodies}
    assert len(keys) == len(bodies)


@pytest.mark.parametrize("depth", [200, 5_000, 200_000])
def test_deeply_nested_json_is_answered_through_the_cache(
    proxy: RunningProxy, upstream: Upstream, depth: int
) -> None:
    """Regression: past Python's recursion limit `json.loads` raised RecursionError, the cache addon
    crashed, and mitmproxy forwarded the request itself (no X-Cache, nothing counted)."""
    path = f"/v2/models/deep{depth}/infer"
    upstream.reply(path, Reply(body=b'{"outputs": []}'))  # the test upstream would recurse too
    body = b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
    first, second = post_raw(proxy, upstream, body, path), post_raw(proxy, upstream, body, path)
    assert first.status == second.status == 200
    assert (first.header("X-Cache"), second.header("X-Cache")) == ("MISS", "HIT")
    assert upstream.calls(path) == 1


# --- slow clients and floods --------------------------------------------------------------------------


def test_slow_clients_do_not_hold_up_well_behaved_ones(proxy: RunningProxy, upstream: Upstream) -> None:
    """Slowloris-style: a few connections dribble a request head a byte at a time (for a bounded few
    seconds) while well-behaved clients are served as usual."""
    head = f"POST {upstream.url(EMBEDDINGS)} HTTP/1.1\r\nHost: {hostport(upstream)}\r\n".encode()
    stop = threading.Event()
    slow = [RawConnection(proxy.host, proxy.port, timeout=10) for _ in range(8)]

    def dribble(connection: RawConnection) -> None:
        for index in range(len(head)):
            if stop.is_set():
                return
            connection.send(head[index : index + 1])
            time.sleep(0.05)

    threads = [threading.Thread(target=dribble, args=(connection,), daemon=True) for connection in slow]
    try:
        for thread in threads:
            thread.start()
        started = time.monotonic()
        for index in range(10):
            well_behaved(proxy, upstream, f"beside slow clients {index}")
        assert time.monotonic() - started < 30, "well-behaved clients waited for slow ones"
        assert any(thread.is_alive() for thread in threads), "the slow clients were not slow"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        for connection in slow:
            connection.close()


def test_connections_over_the_limit_are_closed_while_connected_clients_are_served(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    time.sleep(0.5)  # connections of earlier tests are closed by now
    with proxy.session() as session:
        # A client connected before the flood keeps its (kept-alive) connection and is served throughout.
        assert session.post(upstream.url(EMBEDDINGS), json={"input": "before flood"}, timeout=30).ok
        flood = [RawConnection(proxy.host, proxy.port, timeout=10) for _ in range(CONNECTION_LIMIT + 16)]
        try:
            with ThreadPoolExecutor(16) as pool:
                closed = list(pool.map(lambda connection: connection.is_closed_by_peer(timeout=3), flood))
            admitted = closed.count(False)
            # The session's connection holds one place; the rest of the limit goes to the flood.
            assert admitted == CONNECTION_LIMIT - 1, (admitted, closed)
            for index in range(5):
                answer = session.post(upstream.url(EMBEDDINGS), json={"input": f"during {index}"}, timeout=30)
                assert answer.status_code == 200 and answer.headers["X-Cache"] == "MISS"
            with pytest.raises(requests.ConnectionError), requests.Session() as newcomer:
                newcomer.trust_env = False
                newcomer.post(
                    upstream.url(EMBEDDINGS), json={"input": "x"}, proxies=proxy.proxies, timeout=10
                )
        finally:
            for connection in flood:
                connection.close()
    deadline = time.monotonic() + 10
    while "rule=max_client_connections" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "rule=max_client_connections" in proxy.log()
    time.sleep(0.5)  # the flood's connections close; newcomers are admitted again (checked after the test)
