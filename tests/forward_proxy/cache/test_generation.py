"""Completions and chat completions through a real `forward-proxy run`, against a loopback upstream that
answers as an OpenAI-compatible server does (JSON, or Server-Sent Events when `stream` is true)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Received, Reply, Upstream

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
WORDS = ["A", " forward", " proxy", " is", " a", " server", "."]


def chat_answer(received: Received) -> bytes:
    """A completion whose text names the upstream call, so two computations never look alike."""
    request = json.loads(received.body)
    text = "".join(WORDS) + f" (call {received.call})"
    usage = {"prompt_tokens": 9, "completion_tokens": len(WORDS) + 1, "total_tokens": 9 + len(WORDS) + 1}
    if not request.get("stream"):
        return json.dumps(
            {
                "id": f"chatcmpl-{received.call}",
                "object": "chat.completion",
                "model": request["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": usage,
            }
        ).encode()
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    ]
    chunks += [
        {"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
        for w in [*WORDS, f" (call {received.call})"]
    ]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"choices": [], "usage": usage})
    events = [
        b"data: "
        + json.dumps({"id": f"chatcmpl-{received.call}", "object": "chat.completion.chunk", **chunk}).encode()
        for chunk in chunks
    ]
    return b"\n\n".join([*events, b"data: [DONE]"]) + b"\n\n"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream(model_version="smol-1") as server:
        server.reply(CHAT, Reply(body=chat_answer))
        yield server


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[RunningProxy]:
    with start_proxy(tmp_path) as running:
        yield running


def ask(
    proxy: RunningProxy, upstream: Upstream, headers: dict[str, str] | None = None, **fields: Any
) -> requests.Response:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is a forward proxy?"}],
        **fields,
    }
    with proxy.session() as session:
        return session.post(upstream.url(CHAT), json=body, headers=headers or {}, timeout=30)


def streamed_texts(answer: requests.Response) -> tuple[list[str], str]:
    """The `data:` events of a streamed answer and the text its deltas add up to."""
    events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    text = "".join(
        choice["delta"].get("content", "")
        for event in events
        if event != "[DONE]"
        for choice in json.loads(event)["choices"]
    )
    return events, text


def test_a_greedy_chat_answer_is_a_miss_then_a_hit_with_the_same_bytes(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    first, second = ask(proxy, upstream, temperature=0), ask(proxy, upstream, temperature=0)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.content == first.content and upstream.calls(CHAT) == 1
    assert second.json()["usage"] == first.json()["usage"]  # as the model reported it
    assert second.headers["X-Cache-Saved-Tokens"] == str(len(WORDS) + 1)


def test_a_sampled_request_passes_through_unless_the_client_accepts_a_stored_sample(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    sampled = [ask(proxy, upstream, temperature=0.8) for _ in range(2)]
    assert [answer.headers["X-Cache"] for answer in sampled] == ["BYPASS", "BYPASS"]
    assert sampled[0].content != sampled[1].content and upstream.calls(CHAT) == 2
    asked = [ask(proxy, upstream, {"Cache-Control": "max-age=600"}, temperature=0.8) for _ in range(2)]
    assert [answer.headers["X-Cache"] for answer in asked] == ["MISS", "HIT"]
    assert seeded_twice(proxy, upstream) == ["MISS", "HIT"]


def seeded_twice(proxy: RunningProxy, upstream: Upstream) -> list[str]:
    return [ask(proxy, upstream, temperature=0.8, seed=42).headers["X-Cache"] for _ in range(2)]


def test_a_streamed_hit_arrives_as_the_original_events_ending_in_done(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    upstream.reply(CHAT, Reply(body=chat_answer, content_type="text/event-stream"))
    first = ask(proxy, upstream, temperature=0, stream=True)
    second = ask(proxy, upstream, temperature=0, stream=True)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.headers["Content-Type"].startswith("text/event-stream")
    events, text = streamed_texts(second)
    assert len(events) >= len(WORDS) and events[-1] == "[DONE]"
    assert second.content == first.content and text == "".join(WORDS) + " (call 1)"
    assert upstream.calls(CHAT) == 1


def without_usage(received: Received) -> bytes:
    """A stream as OpenAI sends it when the request did not ask for usage: no usage chunk."""
    return b"".join(
        event + b"\n\n" for event in chat_answer(received).split(b"\n\n") if event and b'"usage"' not in event
    )


def test_a_whole_answer_answers_the_same_request_streamed(proxy: RunningProxy, upstream: Upstream) -> None:
    whole = ask(proxy, upstream, temperature=0)
    with_usage = ask(proxy, upstream, temperature=0, stream=True, stream_options={"include_usage": True})
    plain_stream = ask(proxy, upstream, temperature=0, stream=True)
    assert [a.headers["X-Cache"] for a in (whole, with_usage, plain_stream)] == ["MISS", "HIT", "HIT"]
    assert upstream.calls(CHAT) == 1
    content = whole.json()["choices"][0]["message"]["content"]
    for streamed in (with_usage, plain_stream):
        assert streamed.headers["Content-Type"].startswith("text/event-stream")
        events, text = streamed_texts(streamed)
        assert text == content and events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert {chunk["id"] for chunk in chunks} == {whole.json()["id"]}
        assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == [
            "stop"
        ]
        assert streamed.headers["X-Cache-Saved-Tokens"] == str(len(WORDS) + 1)  # the whole answer's usage
    assert json.loads(streamed_texts(with_usage)[0][-2])["usage"] == whole.json()["usage"]
    assert all("usage" not in json.loads(event) for event in streamed_texts(plain_stream)[0][:-1])


def test_a_stream_with_usage_answers_the_same_request_unstreamed(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    upstream.reply(CHAT, Reply(body=chat_answer, content_type="text/event-stream"))
    streamed = ask(proxy, upstream, temperature=0, stream=True, stream_options={"include_usage": True})
    whole = ask(proxy, upstream, temperature=0)
    assert (streamed.headers["X-Cache"], whole.headers["X-Cache"]) == ("MISS", "HIT")
    assert whole.headers["Content-Type"] == "application/json" and upstream.calls(CHAT) == 1
    answer = whole.json()
    assert answer["object"] == "chat.completion" and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"] == streamed_texts(streamed)[1]
    assert answer["usage"] == json.loads(streamed_texts(streamed)[0][-2])["usage"]


def test_a_stream_without_usage_does_not_answer_an_unstreamed_request(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    """A whole answer always carries usage; a stream without it cannot be turned into one honestly."""
    upstream.reply(CHAT, Reply(body=without_usage, content_type="text/event-stream"))
    streamed = ask(proxy, upstream, temperature=0, stream=True)
    assert streamed.headers["X-Cache"] == "MISS" and streamed_texts(streamed)[0][-1] == "[DONE]"
    upstream.reply(CHAT, Reply(body=chat_answer))
    whole = ask(proxy, upstream, temperature=0)
    assert whole.headers["X-Cache"] == "MISS" and upstream.calls(CHAT) == 2
    assert whole.json()["choices"][0]["message"]["content"].endswith("(call 2)")


def test_a_stream_cut_mid_way_is_not_stored(proxy: RunningProxy, upstream: Upstream) -> None:
    upstream.reply(CHAT, Reply(body=chat_answer, content_type="text/event-stream", close_mid_response=True))
    with pytest.raises(requests.exceptions.RequestException):
        ask(proxy, upstream, temperature=0, stream=True).content  # noqa: B018
    upstream.reply(CHAT, Reply(body=chat_answer, content_type="text/event-stream"))
    again = ask(proxy, upstream, temperature=0, stream=True)
    assert again.headers["X-Cache"] == "MISS" and streamed_texts(again)[0][-1] == "[DONE]"
    assert upstream.calls(CHAT) == 2


def test_eight_identical_streamed_requests_cause_one_generation(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    upstream.reply(CHAT, Reply(body=chat_answer, content_type="text/event-stream", delay=0.5))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(proxy, upstream, temperature=0, stream=True), range(8)))
    assert upstream.calls(CHAT) == 1
    assert len({answer.content for answer in answers}) == 1
    assert all(streamed_texts(answer)[0][-1] == "[DONE]" for answer in answers)
    assert sorted(answer.headers["X-Cache"] for answer in answers) == ["COALESCED"] * 7 + ["MISS"]


class TricklingUpstream:
    """A raw loopback upstream that sends a stream's first event at once and the rest a second later, as
    a model generating tokens does."""

    def __init__(self, *, cut: bool = False) -> None:
        self.cut = cut  # close the connection after the first event instead of finishing
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.calls = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next(
                    (
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    b"0",  # the cache's version check: a GET
                )
            )
            while len(body) < length:
                body += connection.recv(65536)
            if not head.startswith(b"POST "):  # the cache's version check: no version here
                connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            self.calls += 1
            first = b'data: {"choices":[{"index":0,"delta":{"content":"A"},"finish_reason":null}]}\n\n'
            rest = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n" % (len(first), first)
            )
            time.sleep(1.0)
            if not self.cut:
                connection.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("temperature", [0, 0.9], ids=["cached (MISS)", "sampled (BYPASS)"])
def test_a_stream_passes_event_by_event_not_held_back(proxy: RunningProxy, temperature: float) -> None:
    trickling = TricklingUpstream()
    try:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "temperature": temperature,
        }
        with proxy.session() as session:
            started = time.monotonic()
            answer = session.post(
                f"http://127.0.0.1:{trickling.port}{CHAT}", json=body, stream=True, timeout=30
            )
            lines = answer.iter_lines()
            first = next(line for line in lines if line)
            first_after = time.monotonic() - started
            rest = [line for line in lines if line]
    finally:
        trickling.close()
    assert first.startswith(b"data: ") and first_after < 0.8, f"the first event took {first_after:.2f} s"
    assert rest[-1] == b"data: [DONE]"


def test_a_request_identical_to_a_stream_still_arriving_follows_it_live(proxy: RunningProxy) -> None:
    """The second client gets the events so far at once and the rest as the upstream sends them (not when
    the first stream completed), and the model generates once."""
    trickling = TricklingUpstream()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "temperature": 0}
    url = f"http://127.0.0.1:{trickling.port}{CHAT}"
    try:
        with proxy.session() as first_session, proxy.session() as second_session:
            first = first_session.post(url, json=body, stream=True, timeout=30)
            first_lines = first.iter_lines()
            assert next(line for line in first_lines if line).startswith(b"data: ")  # the upstream is midway
            started = time.monotonic()
            second = second_session.post(url, json=body, stream=True, timeout=30)
            second_lines = second.iter_lines()
            second_first = next(line for line in second_lines if line)
            second_first_after = time.monotonic() - started
            second_rest = [line for line in second_lines if line]
            first_rest = [line for line in first_lines if line]
    finally:
        trickling.close()
    assert trickling.calls == 1
    assert second.headers["X-Cache"] == "COALESCED" and first.headers["X-Cache"] == "MISS"
    assert second.headers["Content-Type"] == "text/event-stream"
    assert second_first_after < 0.7, f"the follower's first event took {second_first_after:.2f} s"
    assert second_first.startswith(b'data: {"choices":[{"index":0,"delta":{"content":"A"}')
    assert second_rest == first_rest and second_rest[-1] == b"data: [DONE]"


def test_a_follower_of_a_stream_cut_short_sees_it_cut_and_nothing_is_stored(proxy: RunningProxy) -> None:
    trickling = TricklingUpstream(cut=True)
    body = {"model": "m", "messages": [{"role": "user", "content": "cut"}], "stream": True, "temperature": 0}
    url = f"http://127.0.0.1:{trickling.port}{CHAT}"

    def read_all(answer: requests.Response) -> tuple[list[bytes], bool]:
        lines: list[bytes] = []
        try:
            lines.extend(line for line in answer.iter_lines() if line)
        except requests.exceptions.RequestException:
            return lines, False
        return lines, True

    try:
        with proxy.session() as first_session, proxy.session() as second_session:
            first = first_session.post(url, json=body, stream=True, timeout=30)
            first_lines = first.iter_lines()
            assert next(line for line in first_lines if line).startswith(b"data: ")
            second = second_session.post(url, json=body, stream=True, timeout=30)
            second_lines, second_whole = read_all(second)
        assert second.headers["X-Cache"] == "COALESCED"
        assert not second_whole or b"data: [DONE]" not in second_lines  # never a made-up end
        assert second_lines[:1] == [
            b'data: {"choices":[{"index":0,"delta":{"content":"A"},"finish_reason":null}]}'
        ]
        with proxy.session() as session:
            again = session.post(url, json=body, stream=True, timeout=30)
            again.close()
        assert again.headers["X-Cache"] == "MISS" and trickling.calls == 2  # the cut stream was not stored
    finally:
        trickling.close()


def test_a_streamed_hit_is_paced_like_the_original_when_the_client_asks(proxy: RunningProxy) -> None:
    trickling = TricklingUpstream()  # its second part came a second after the first
    body = {"model": "m", "messages": [{"role": "user", "content": "pace"}], "stream": True, "temperature": 0}
    url = f"http://127.0.0.1:{trickling.port}{CHAT}"

    def timed(headers: dict[str, str]) -> tuple[requests.Response, list[bytes], float, float]:
        with proxy.session() as session:
            started = time.monotonic()
            answer = session.post(url, json=body, headers=headers, stream=True, timeout=30)
            lines = answer.iter_lines()
            first = next(line for line in lines if line)
            first_after = time.monotonic() - started
            rest = [line for line in lines if line]
            return answer, [first, *rest], first_after, time.monotonic() - started

    try:
        miss, original, _, _ = timed({})
        prompt, prompt_lines, _, prompt_total = timed({})
        paced, paced_lines, paced_first, paced_total = timed({"X-Cache-Replay": "paced"})
    finally:
        trickling.close()
    assert [miss.headers["X-Cache"], prompt.headers["X-Cache"], paced.headers["X-Cache"]] == [
        "MISS",
        "HIT",
        "HIT",
    ]
    assert trickling.calls == 1 and prompt_lines == paced_lines == original
    assert prompt_total < 0.5, f"a hit took {prompt_total:.2f} s"
    assert paced_first < 0.5 and paced_total >= 0.9, (
        f"paced: first {paced_first:.2f} s, all {paced_total:.2f} s"
    )
    assert paced.headers["Content-Type"] == "text/event-stream"
    assert "x-cache-stream-pacing" not in {name.lower() for name in paced.headers}
