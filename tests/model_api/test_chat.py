"""The chat model on a real `model-api serve`: the openai SDK (stream and not), determinism, limits,
refusals, a client that goes away, and embeddings that never wait behind a generation.

One server per module (the chat model takes many seconds to load), started offline with an empty
Hugging Face home, so that any attempt to download would fail the load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import requests

from tests.model_api.conftest import Server, http
from tests.support.model_server import start_model_api

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAT_MODEL = "SmolLM2-135M-Instruct"
LIMITS = {"max_generated_tokens": 64, "max_prompt_tokens": 200, "max_generation_batch": 4, "max_queued": 2}
QUESTION = [{"role": "user", "content": "What is a forward proxy? Answer in one sentence."}]
LONG = [{"role": "user", "content": "Count from 1 to 200, one number per line."}]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("chat")
    empty_home = work / "hf-home"
    empty_home.mkdir()
    env = {
        **{k: v for k, v in __import__("os").environ.items() if not k.upper().endswith("_PROXY")},
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(empty_home),
    }
    process, url = start_model_api(
        work,
        "--model",
        "all-MiniLM-L6-v2",
        "--max-generated-tokens",
        str(LIMITS["max_generated_tokens"]),
        "--max-prompt-tokens",
        str(LIMITS["max_prompt_tokens"]),
        "--max-generation-batch",
        str(LIMITS["max_generation_batch"]),
        "--max-queued-generations",
        str(LIMITS["max_queued"]),
        chat=True,
        env=env,
    )
    try:
        yield Server(process, url)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def sdk(chat_server: Server) -> Iterator[openai.OpenAI]:
    with httpx.Client(trust_env=False, timeout=120) as transport:
        yield openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key="unused", http_client=transport)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with http() as client:
        yield client


def chat(session: requests.Session, url: str, **body: Any) -> requests.Response:
    return session.post(
        f"{url}/v1/chat/completions",
        json={"messages": QUESTION, **body},
        timeout=120,
        stream=bool(body.get("stream")),  # read as it arrives, not in full before returning
    )


def chat_stats(session: requests.Session, url: str) -> dict[str, Any]:
    stats: dict[str, Any] = session.get(f"{url}/stats", timeout=10).json()["chat_models"][CHAT_MODEL]
    return stats


def test_the_sdk_gets_an_answer_with_usage_and_the_prompt_tokens_header(
    sdk: openai.OpenAI, chat_server: Server
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,  # type: ignore[arg-type]
    )
    answer = raw.parse()
    assert answer.object == "chat.completion" and answer.model == CHAT_MODEL
    assert answer.choices[0].message.role == "assistant"
    assert "proxy" in (answer.choices[0].message.content or "").lower()
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens <= 24
    assert raw.headers["X-Input-Tokens"] == str(answer.usage.prompt_tokens)
    assert raw.headers["X-Model-Version"]
    assert answer.system_fingerprint


def test_the_sdk_streams_chunks_that_add_up_to_the_greedy_answer(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=24)  # type: ignore[arg-type]
    chunks = list(
        sdk.chat.completions.create(
            model=CHAT_MODEL,
            messages=QUESTION,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [
        chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content
    ]
    assert len(content) > 3  # sent token by token, not as one block
    assert "".join(content) == whole.choices[0].message.content
    finals = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_the_raw_stream_is_openai_server_sent_events_ending_in_done(
    session: requests.Session, chat_server: Server
) -> None:
    with chat(session, chat_server.url, temperature=0, max_tokens=8, stream=True) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all("usage" not in chunk for chunk in chunks)  # only with stream_options.include_usage


def test_greedy_answers_repeat_byte_for_byte(session: requests.Session, chat_server: Server) -> None:
    answers = [chat(session, chat_server.url, temperature=0, max_tokens=32).json() for _ in range(2)]
    assert answers[0]["choices"] == answers[1]["choices"]
    assert answers[0]["usage"] == answers[1]["usage"]


def test_a_seed_makes_sampling_reproducible(session: requests.Session, chat_server: Server) -> None:
    def sampled(seed: int) -> list[Any]:
        body = chat(session, chat_server.url, temperature=1.0, seed=seed, n=2, max_tokens=24).json()
        return [choice["message"]["content"] for choice in body["choices"]]

    first = sampled(7)
    assert first == sampled(7)
    assert len(first) == 2 and first[0] != first[1]  # each choice draws on its own


def test_a_stop_sequence_ends_the_answer_without_itself(
    session: requests.Session, chat_server: Server
) -> None:
    body = chat(session, chat_server.url, messages=LONG, temperature=0, max_tokens=60, stop=["5"]).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "4" in choice["message"]["content"] and "5" not in choice["message"]["content"]


def test_completions_continue_a_plain_prompt(sdk: openai.OpenAI) -> None:
    answer = sdk.completions.create(
        model=CHAT_MODEL, prompt="The capital of France is", temperature=0, max_tokens=5
    )
    assert answer.object == "text_completion"
    assert "Paris" in answer.choices[0].text
    streamed = sdk.completions.create(
        model=CHAT_MODEL, prompt="The capital of France is", temperature=0, max_tokens=5, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == answer.choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"max_tokens": 65}, 400, "max_tokens_too_large", "max_tokens"),
        ({"max_completion_tokens": 1000}, 400, "max_tokens_too_large", "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "prompt_too_long", "messages"),
        ({"n": 5}, 400, "too_many_choices", "n"),
        ({"messages": []}, 422, "invalid_request", "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "invalid_request", "messages.0.role"),
        ({"temperature": 3}, 422, "invalid_request", "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_request", "stop"),
        ({"model": "no-such-model"}, 404, "model_not_found", "model"),
        ({"model": "all-MiniLM-L6-v2"}, 400, "not_a_chat_model", "model"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter", "tools"),
        ({"logprobs": True}, 400, "unsupported_parameter", "logprobs"),
    ],
)
def test_bad_requests_get_a_clear_error(
    session: requests.Session, chat_server: Server, body: dict[str, Any], status: int, code: str, param: str
) -> None:
    response = chat(session, chat_server.url, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"]


def test_the_sdk_raises_with_the_servers_message(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="generates at most 64 tokens"):
        sdk.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=500)  # type: ignore[arg-type]


def first_chunks(events: Iterator[str], count: int) -> list[str]:
    """The first `count` events; the caller keeps `events` (dropping it mid-stream closes the connection)."""
    lines: list[str] = []
    for line in events:
        if line:
            lines.append(line)
        if len(lines) >= count:
            break
    return lines


def wait_for(condition: Any, describe: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not reached in {timeout} s: {describe()}"
        time.sleep(0.1)


def test_a_client_that_disconnects_stops_its_generation(
    session: requests.Session, chat_server: Server
) -> None:
    before = chat_stats(session, chat_server.url)
    with http() as leaving:  # its own connection, closed with it
        response = chat(leaving, chat_server.url, messages=LONG, temperature=0, max_tokens=64, stream=True)
        assert len(first_chunks(response.iter_lines(decode_unicode=True), 3)) == 3
        response.close()
    now = lambda: chat_stats(session, chat_server.url)  # noqa: E731
    wait_for(lambda: now()["cancelled"] == before["cancelled"] + 1, lambda: (before, now()))
    wait_for(lambda: now()["active_sequences"] == 0, now)
    after = chat_stats(session, chat_server.url)
    # Counting to 200 takes far more than 64 tokens: a complete answer would have added 64.
    assert after["completion_tokens"] == before["completion_tokens"]
    assert "its client went away" in chat_server.log()


def test_a_non_streamed_request_whose_client_leaves_is_stopped_too(chat_server: Server) -> None:
    before = chat_stats(http(), chat_server.url)["cancelled"]
    with pytest.raises(requests.exceptions.ReadTimeout):
        http().post(
            f"{chat_server.url}/v1/chat/completions",
            json={"messages": LONG, "temperature": 0, "max_tokens": 64},
            timeout=(5, 0.5),
        )
    now = lambda: chat_stats(http(), chat_server.url)  # noqa: E731
    wait_for(lambda: now()["cancelled"] == before + 1, now)


def test_embeddings_are_answered_while_a_generation_streams(
    session: requests.Session, chat_server: Server
) -> None:
    with chat(session, chat_server.url, messages=LONG, temperature=0, max_tokens=64, stream=True) as stream:
        lines = stream.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line)  # the generation has started
        embedded = http().post(f"{chat_server.url}/v1/embeddings", json={"input": "hello"}, timeout=60)
        assert embedded.status_code == 200
        rest = [line for line in lines if line]
    # The stream was still going when the embedding came back: it had most of its tokens to go.
    assert rest[-1] == "data: [DONE]" and len(rest) > 20


def test_requests_past_the_queue_bound_get_503(session: requests.Session, chat_server: Server) -> None:
    streams: list[requests.Response] = []
    try:
        # A full batch (n = max_generation_batch) generating long answers ...
        busy = chat(http(), chat_server.url, messages=LONG, temperature=0, max_tokens=64, n=4, stream=True)
        streams.append(busy)
        busy_events = busy.iter_lines(decode_unicode=True)
        assert len(first_chunks(busy_events, 5)) == 5  # four openers, then the first token
        now = lambda: chat_stats(session, chat_server.url)  # noqa: E731
        wait_for(lambda: now()["active_sequences"] == 4, now)
        # ... then as many waiting requests as the queue holds.
        for _ in range(LIMITS["max_queued"]):
            streams.append(chat(http(), chat_server.url, temperature=0, max_tokens=8, stream=True))
        assert [stream.status_code for stream in streams] == [200] * len(streams)
        assert now()["waiting"] == LIMITS["max_queued"]
        refused = chat(http(), chat_server.url, temperature=0, max_tokens=8)
        assert refused.status_code == 503, (refused.text, chat_stats(session, chat_server.url))
        assert refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["Retry-After"] == "1"
        # The full batch was busy all along: its stream still goes on.
        assert next(line for line in busy_events if line) != "data: [DONE]"
    finally:
        for stream in streams:
            stream.close()
    idle = lambda: now()["waiting"] == 0 and now()["active_sequences"] == 0  # noqa: E731
    wait_for(idle, now)  # the closed streams' requests are dropped


def test_the_server_without_chat_says_so(server: Server, client: requests.Session) -> None:
    response = client.post(f"{server.url}/v1/chat/completions", json={"messages": QUESTION}, timeout=30)
    assert response.status_code == 404
    assert "--no-chat" in response.json()["error"]["message"]


def test_stats_and_log_count_the_generations(
    session: requests.Session, chat_server: Server, tmp_path: Path
) -> None:
    chat(session, chat_server.url, temperature=0, max_tokens=4)
    stats = chat_stats(session, chat_server.url)
    assert stats["requests"] >= 1 and stats["completion_tokens"] >= 4 and stats["decode_steps"] >= 4
    lines = [json.loads(line) for line in chat_server.log().splitlines() if line.startswith('{"time"')]
    chats = [line for line in lines if line.get("path") == "/v1/chat/completions" and line["status"] == 200]
    assert chats and chats[-1]["model"] == CHAT_MODEL and chats[-1]["completion_tokens"] == 4


def test_requests_that_arrive_while_another_decodes_join_its_batch_with_the_same_answers(
    session: requests.Session, chat_server: Server
) -> None:
    questions = ["Name three fruits.", "Write a haiku about cats."]  # no more than the queue holds
    alone = [
        chat(
            session, chat_server.url, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24
        ).json()
        for q in questions
    ]
    before = chat_stats(session, chat_server.url)
    with http() as first_session:
        first = chat(first_session, chat_server.url, messages=LONG, temperature=0, max_tokens=64, stream=True)
        events = first.iter_lines(decode_unicode=True)
        first_chunks(events, 2)  # decoding
        with ThreadPoolExecutor(len(questions)) as pool:
            late = list(
                pool.map(
                    lambda q: chat(
                        http(),
                        chat_server.url,
                        messages=[{"role": "user", "content": q}],
                        temperature=0,
                        max_tokens=24,
                    ).json(),
                    questions,
                )
            )
        first.close()
    after = chat_stats(session, chat_server.url)
    assert after["merges"] > before["merges"]  # fails loudly if transformers' cache layout changed
    assert [answer["choices"] for answer in late] == [answer["choices"] for answer in alone]


def test_the_chat_model_is_listed_with_the_others(sdk: openai.OpenAI) -> None:
    assert {model.id for model in sdk.models.list()} == {"all-MiniLM-L6-v2", CHAT_MODEL}
    assert sdk.models.retrieve(CHAT_MODEL).id == CHAT_MODEL


def test_an_answer_done_at_its_first_token_leaves_the_running_batch_intact(chat_server: Server) -> None:
    with http() as own:
        running = chat(own, chat_server.url, messages=LONG, temperature=0, max_tokens=32, stream=True)
        events = running.iter_lines(decode_unicode=True)
        first_chunks(events, 2)
        short = chat(http(), chat_server.url, temperature=0, max_tokens=1).json()
        assert short["usage"]["completion_tokens"] == 1
        rest = [line for line in events if line]
    assert rest[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in rest)


def test_a_stream_of_several_choices_opens_and_ends_each(
    session: requests.Session, chat_server: Server
) -> None:
    with chat(session, chat_server.url, temperature=0.8, seed=3, n=2, max_tokens=8, stream=True) as response:
        chunks = [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines(decode_unicode=True)
            if line and line != "data: [DONE]"
        ]
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    assert [choice["delta"].get("role") for choice in choices[:2]] == ["assistant", "assistant"]
    assert sorted(choice["index"] for choice in choices if choice["finish_reason"]) == [0, 1]
    texts = ["".join(c["delta"].get("content", "") for c in choices if c["index"] == i) for i in (0, 1)]
    whole = chat(session, chat_server.url, temperature=0.8, seed=3, n=2, max_tokens=8).json()
    assert texts == [choice["message"]["content"] for choice in whole["choices"]]
