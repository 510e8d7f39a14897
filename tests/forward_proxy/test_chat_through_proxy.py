"""The OpenAI SDK through the forward proxy against the real chat model (SmolLM2-135M-Instruct).

One model server with its chat model (tens of seconds to load here) and one proxy serve the whole module;
each test asks its own question, so no test depends on what another one left in the cache. Answers are
kept short (`max_tokens` 24): a cold greedy answer takes a second or two on this CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.model_server import start_model_api
from tests.support.proxy import RunningProxy, start_proxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 24
CHAT_READY_TIMEOUT = 300.0  # the chat model's load on a loaded 2-core machine


@pytest.fixture(scope="module")
def model_api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work: Path = tmp_path_factory.mktemp("chat-model-api")
    process, url = start_model_api(
        work, "--max-generated-tokens", "64", chat=True, timeout=CHAT_READY_TIMEOUT
    )
    try:
        yield url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    with start_proxy(tmp_path_factory.mktemp("chat-proxy")) as running:
        yield running


@pytest.fixture
def client(model_api_url: str, proxy: RunningProxy) -> Iterator[openai.OpenAI]:
    """The OpenAI SDK pointed at the model API, every request through the proxy (not the environment's)."""
    http_client = httpx.Client(proxy=proxy.url, trust_env=False, timeout=120.0)
    sdk = openai.OpenAI(
        base_url=f"{model_api_url}/v1", api_key="unused", http_client=http_client, max_retries=0
    )
    try:
        yield sdk
    finally:
        sdk.close()


def ask(question: str) -> list[openai.types.chat.ChatCompletionMessageParam]:
    return [{"role": "user", "content": question}]


@dataclass
class Streamed:
    x_cache: str | None
    saved_tokens: str | None
    text: str
    content_chunks: int
    finish_reasons: list[str]
    completion_tokens: int | None


def stream_once(client: openai.OpenAI, question: str) -> Streamed:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=ask(question),
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, content_chunks, finish_reasons, completion_tokens = "", 0, [], None
    for chunk in raw.parse():  # ends at `data: [DONE]` (or when the connection closes)
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
                content_chunks += 1
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    return Streamed(
        raw.headers.get("X-Cache"),
        raw.headers.get("X-Cache-Saved-Tokens"),
        text,
        content_chunks,
        finish_reasons,
        completion_tokens,
    )


def test_a_greedy_chat_completion_is_computed_once_then_served_from_the_cache(client: openai.OpenAI) -> None:
    question = "What does a forward proxy do? Answer in one sentence."
    answers = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ask(question), temperature=0, max_tokens=MAX_TOKENS
        )
        answers.append((raw.headers.get("X-Cache"), raw.headers.get("X-Cache-Saved-Tokens"), raw.parse()))

    (first_cache, first_saved, first), (second_cache, second_saved, second) = answers
    assert (first_cache, second_cache) == ("MISS", "HIT")
    assert first_saved is None
    content = first.choices[0].message.content
    assert content, first
    assert second.choices[0].message.content == content
    assert second.choices[0].finish_reason == first.choices[0].finish_reason in ("stop", "length")
    assert first.usage is not None and second.usage == first.usage
    assert second_saved == str(first.usage.completion_tokens)


def test_a_greedy_streamed_answer_is_replayed_as_the_same_events(client: openai.OpenAI) -> None:
    question = "Name three uses of a cache, briefly."
    first = stream_once(client, question)
    second = stream_once(client, question)

    assert first.x_cache == "MISS"
    assert first.content_chunks > 3 and first.finish_reasons in (["stop"], ["length"]), first
    assert second.x_cache == "HIT"
    assert second.text == first.text
    assert second.content_chunks == first.content_chunks  # the original events, not one lump
    assert second.finish_reasons == first.finish_reasons
    assert second.completion_tokens == first.completion_tokens is not None
    assert second.saved_tokens == str(first.completion_tokens)

    # The replay ends as the original did: the finish chunk, the usage chunk, then `data: [DONE]`.
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=ask(question),
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    ) as replay:
        assert replay.headers["X-Cache"] == "HIT"
        assert replay.headers["content-type"].startswith("text/event-stream")
        body = b"".join(replay.iter_bytes())
    events = [event for event in body.replace(b"\r\n", b"\n").split(b"\n\n") if event.strip()]
    assert len(events) > 3, body
    assert events[-1] == b"data: [DONE]", body[-300:]


def test_a_sampled_chat_completion_passes_the_cache_by(client: openai.OpenAI) -> None:
    question = "Write a short line about rivers."
    decisions = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ask(question), temperature=0.9, max_tokens=MAX_TOKENS
        )
        assert raw.parse().choices[0].message.content
        decisions.append(raw.headers.get("X-Cache"))
    assert decisions == ["BYPASS", "BYPASS"]


def test_a_whole_answer_and_a_stream_of_the_same_question_answer_each_other(client: openai.OpenAI) -> None:
    """A greedy stream (with usage) is generated once; the same question unstreamed is a HIT made from it,
    and a streamed request for a question first asked whole is a HIT made from the whole answer."""
    question = "Why do teams cache model answers? One sentence."
    streamed = stream_once(client, question)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask(question), temperature=0, max_tokens=MAX_TOKENS
    )
    whole = raw.parse()
    assert (streamed.x_cache, raw.headers.get("X-Cache")) == ("MISS", "HIT")
    assert whole.choices[0].message.content == streamed.text and streamed.text
    assert [whole.choices[0].finish_reason] == streamed.finish_reasons
    assert whole.usage is not None and whole.usage.completion_tokens == streamed.completion_tokens
    assert raw.headers.get("X-Cache-Saved-Tokens") == str(streamed.completion_tokens)

    other = "What is a reverse proxy? One sentence."
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask(other), temperature=0, max_tokens=MAX_TOKENS
    )
    answer = first.parse()
    replayed = stream_once(client, other)
    assert (first.headers.get("X-Cache"), replayed.x_cache) == ("MISS", "HIT")
    assert replayed.text == answer.choices[0].message.content
    assert replayed.finish_reasons == [answer.choices[0].finish_reason]
    assert answer.usage is not None and replayed.completion_tokens == answer.usage.completion_tokens
