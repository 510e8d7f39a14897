"""`client-app chat`: a question to the model API's chat model, the answer printed as it is generated.

The request is OpenAI's `POST /v1/chat/completions`; streamed answers are Server-Sent Events, read
chunk by chunk as they arrive (`iter_content(chunk_size=None)`), so each token reaches the terminal
when the model produced it, or, through a caching proxy, when the proxy replays it.

>>> list(sse_payloads([b'data: {"a"', b': 1}\\n\\ndata: [DONE]\\n\\n']))
['{"a": 1}', '[DONE]']
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

from client_app.client import ClientError, ModelApiClient, Reply, http_error, network_error

DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"
CHAT_PATH = "/v1/chat/completions"


@dataclass
class ChatAnswer:
    """The answer's text and how it came: headers, timing, finish reason and token usage."""

    reply: Reply  # status and headers; `seconds` is the time to the whole answer
    text: str = ""
    finish_reason: str | None = None
    usage: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    first_token_seconds: float | None = None  # streamed answers: when the first text arrived
    chunks: int = 0  # streamed answers: content chunks received


def sse_payloads(chunks: Iterable[bytes]) -> Iterator[str]:
    """The `data:` payload of each Server-Sent Event in a byte stream cut anywhere."""
    buffer = b""
    for chunk in chunks:
        buffer = (buffer + chunk).replace(b"\r\n", b"\n")  # a CRLF may be cut between two chunks
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                yield b"\n".join(lines).decode("utf-8")


def chat(
    client: ModelApiClient,
    messages: list[dict[str, str]],
    *,
    model: str = DEFAULT_CHAT_MODEL,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    stream: bool = True,
    on_text: Callable[[str], None] | None = None,
) -> ChatAnswer:
    """Ask `messages`; with `stream`, `on_text` gets each piece of the answer as it arrives."""
    payload: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if seed is not None:
        payload["seed"] = seed
    if not stream:
        reply = client.call("POST", CHAT_PATH, payload)
        body = reply.body if isinstance(reply.body, dict) else {}
        choice = (body.get("choices") or [{}])[0]
        text = str((choice.get("message") or {}).get("content") or "")
        if on_text is not None:
            on_text(text)
        return ChatAnswer(
            reply, text, choice.get("finish_reason"), body.get("usage") or {}, body.get("model")
        )
    payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return _stream(client, payload, on_text)


def _stream(
    client: ModelApiClient, payload: dict[str, Any], on_text: Callable[[str], None] | None
) -> ChatAnswer:
    url = client.api_url + CHAT_PATH
    proxy = client.proxy_for(url)
    started = time.perf_counter()
    try:
        response = client.session.post(
            url, json=payload, timeout=client.timeout, verify=client.verify, stream=True
        )
    except requests.RequestException as exc:
        raise network_error(exc, url, f"the model API at {client.api_url}", proxy, client.timeout) from None
    with response:
        if response.status_code >= 400:
            raise http_error("POST", url, response, proxy)
        reply = Reply("POST", url, response.status_code, response.headers, None, 0.0, proxy)
        answer = ChatAnswer(reply)
        try:
            for data in sse_payloads(response.iter_content(chunk_size=None)):
                if data == "[DONE]":
                    break
                _take_chunk(answer, json.loads(data), url, started, on_text)
        except requests.RequestException as exc:
            raise ClientError(f"the answer from {url} broke off: {exc}") from None
        except ValueError as exc:
            raise ClientError(f"unexpected answer from {url}: an event is not JSON ({exc})") from None
    answer.reply = Reply(
        "POST", url, response.status_code, response.headers, None, time.perf_counter() - started, proxy
    )
    if answer.finish_reason is None:
        raise ClientError(f"the answer from {url} ended before it was complete (no finish_reason)")
    return answer


def _take_chunk(
    answer: ChatAnswer,
    chunk: Any,
    url: str,
    started: float,
    on_text: Callable[[str], None] | None,
) -> None:
    if not isinstance(chunk, dict):
        raise ClientError(f"unexpected answer from {url}: an event is not a JSON object")
    error = chunk.get("error")
    if isinstance(error, dict):
        raise ClientError(f"the answer from {url} broke off: {error.get('code')}: {error.get('message')}")
    answer.model = chunk.get("model", answer.model)
    if isinstance(chunk.get("usage"), dict):
        answer.usage = chunk["usage"]
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content")
        if text:
            if answer.first_token_seconds is None:
                answer.first_token_seconds = time.perf_counter() - started
            answer.text += text
            answer.chunks += 1
            if on_text is not None:
                on_text(text)
        if choice.get("finish_reason"):
            answer.finish_reason = choice["finish_reason"]
