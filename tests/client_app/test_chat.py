"""`client-app chat` against the real model API with its chat model, and the SSE reader it uses."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_app.chat import sse_payloads
from tests.client_app.conftest import clean_environment, client_app
from tests.support.model_server import running_model_api

QUESTION = ["What", "is", "a", "forward", "proxy?"]


def test_events_are_found_wherever_the_bytes_are_cut() -> None:
    body = b'data: {"a": 1}\r\n\r\n: a comment\n\ndata: {"b":\ndata: 2}\n\ndata: [DONE]\n\n'
    for size in (1, 2, 7, len(body)):
        pieces = [body[start : start + size] for start in range(0, len(body), size)]
        assert list(sse_payloads(pieces)) == ['{"a": 1}', '{"b":\n2}', "[DONE]"]


@pytest.fixture(scope="module")
def chat_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work: Path = tmp_path_factory.mktemp("chat-api")
    with running_model_api(work, "--max-generated-tokens", "64", chat=True) as url:
        yield url


def answer_of(stdout: str) -> str:
    """The answer: everything before the line with the status."""
    return stdout.split("\nPOST ", 1)[0]


@pytest.mark.integration
@pytest.mark.slow
def test_chat_streams_the_answer_and_says_how_it_came(chat_api: str) -> None:
    result = client_app("chat", *QUESTION, "--max-tokens", "24", "--api-url", chat_api, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "proxy" in answer_of(result.stdout).lower()
    status = re.search(
        r"→ 200, first token in [\d.]+ ms, [\d.]+ ms in all \(streamed in (\d+) chunks\)", result.stdout
    )
    assert status and int(status.group(1)) > 3, result.stdout
    assert "X-Cache: (none: the answer did not pass a caching proxy)" in result.stdout
    assert "X-Model-Version: " in result.stdout
    assert re.search(
        r"finish_reason: (stop|length)   usage: prompt_tokens=\d+ completion_tokens=\d+", result.stdout
    )


@pytest.mark.integration
@pytest.mark.slow
def test_no_stream_prints_the_same_greedy_answer(chat_api: str) -> None:
    streamed = client_app("chat", *QUESTION, "--max-tokens", "24", "--api-url", chat_api, timeout=120)
    whole = client_app(
        "chat", *QUESTION, "--max-tokens", "24", "--no-stream", "--api-url", chat_api, timeout=120
    )
    assert whole.returncode == 0, whole.stderr
    assert "(not streamed)" in whole.stdout
    assert answer_of(whole.stdout) == answer_of(streamed.stdout)


@pytest.mark.integration
@pytest.mark.slow
def test_a_refused_question_prints_the_servers_reason(chat_api: str) -> None:
    result = client_app(
        "chat", "hello", "--max-tokens", "1000", "--api-url", chat_api, env=clean_environment(), timeout=120
    )
    assert result.returncode == 1
    assert "400" in result.stderr and "max_tokens_too_large" in result.stderr
    assert "generates at most 64 tokens" in result.stderr
