"""A whole answer from a stored stream and a stream from a stored whole answer (`forward_proxy.cache.streams`).

The bodies below are written as the model API writes them (`model_api/protocols/chat.py`: compact JSON,
its field order, streamed events with `ensure_ascii`, whole answers in UTF-8 as FastAPI renders them) and
as OpenAI's API documents them (spaces, `service_tier`, `obfuscation`, `refusal: null`, usage details).
"""

from __future__ import annotations

import doctest
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forward_proxy.cache import streams
from forward_proxy.cache.streams import (
    answer_to_stream,
    content_key_fields,
    stream_to_answer,
    usage_requested,
)

HEAD = '"id":"chatcmpl-5f2c0e","object":"chat.completion.chunk","created":1767225600,"model":"SmolLM2-135M-Instruct","system_fingerprint":"3f9a1c0d2b7e4a61"'
USAGE = '{"prompt_tokens":31,"completion_tokens":4,"total_tokens":35}'

# `stream: true, stream_options: {include_usage: true}`, one event per generated token.
MODEL_API_CHAT_STREAM = (
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"content":"A"}},"logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"content":" forward"}},"logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"content":" proxy"}},"logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"content":" caf\\u00e9\\n"}},"logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"length"}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[],"usage":{USAGE}}}\n\n'
    "data: [DONE]\n\n"
).encode()

# The same answer with `stream: false`.
MODEL_API_CHAT_ANSWER = (
    '{"id":"chatcmpl-5f2c0e","object":"chat.completion","created":1767225600,"model":"SmolLM2-135M-Instruct",'
    '"system_fingerprint":"3f9a1c0d2b7e4a61","choices":[{"index":0,"message":{"role":"assistant",'
    '"content":"A forward proxy café\\n","refusal":null},"logprobs":null,"finish_reason":"length"}],'
    f'"usage":{USAGE}}}'
).encode()

# What `answer_to_stream` makes of it: the whole text in one chunk.
MODEL_API_CHAT_STREAM_IN_ONE_CHUNK = (
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"content":"A forward proxy caf\\u00e9\\n"}},"logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"length"}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[],"usage":{USAGE}}}\n\n'
    "data: [DONE]\n\n"
).encode()

TEXT_HEAD = '"id":"cmpl-91b7","object":"text_completion","created":1767225601,"model":"SmolLM2-135M-Instruct","system_fingerprint":"3f9a1c0d2b7e4a61"'
TEXT_USAGE = '{"prompt_tokens":6,"completion_tokens":3,"total_tokens":9}'

# `POST /v1/completions` streamed: no role chunk; the last choice chunk has empty text.
MODEL_API_TEXT_STREAM = (
    f'data: {{{TEXT_HEAD},"choices":[{{"index":0,"text":" is","logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{TEXT_HEAD},"choices":[{{"index":0,"text":" blue","logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{TEXT_HEAD},"choices":[{{"index":0,"text":".","logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    f'data: {{{TEXT_HEAD},"choices":[{{"index":0,"text":"","logprobs":null,"finish_reason":"stop"}}],"usage":null}}\n\n'
    f'data: {{{TEXT_HEAD},"choices":[],"usage":{TEXT_USAGE}}}\n\n'
    "data: [DONE]\n\n"
).encode()

MODEL_API_TEXT_ANSWER = (
    '{"id":"cmpl-91b7","object":"text_completion","created":1767225601,"model":"SmolLM2-135M-Instruct",'
    '"system_fingerprint":"3f9a1c0d2b7e4a61","choices":[{"index":0,"text":" is blue.","logprobs":null,'
    f'"finish_reason":"stop"}}],"usage":{TEXT_USAGE}}}'
).encode()

# OpenAI's own chunks: spaces after colons, service_tier, refusal in the first delta, obfuscation padding.
OPENAI_HEAD = '"id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion.chunk", "created": 1741570283, "model": "gpt-4o-2024-08-06", "service_tier": "default", "system_fingerprint": "fp_eb9dce56a8"'
OPENAI_CHAT_STREAM = (
    f'data: {{{OPENAI_HEAD}, "choices": [{{"index": 0, "delta": {{"role": "assistant", "content": "", "refusal": null}}, "logprobs": null, "finish_reason": null}}], "usage": null, "obfuscation": "x1"}}\n\n'
    f'data: {{{OPENAI_HEAD}, "choices": [{{"index": 0, "delta": {{"content": "Hello"}}, "logprobs": null, "finish_reason": null}}], "usage": null, "obfuscation": "Qr"}}\n\n'
    f'data: {{{OPENAI_HEAD}, "choices": [{{"index": 0, "delta": {{"content": "!"}}, "logprobs": null, "finish_reason": null}}], "usage": null, "obfuscation": "Zk9"}}\n\n'
    f'data: {{{OPENAI_HEAD}, "choices": [{{"index": 0, "delta": {{}}, "logprobs": null, "finish_reason": "stop"}}], "usage": null, "obfuscation": "Pq"}}\n\n'
    f'data: {{{OPENAI_HEAD}, "choices": [], "usage": {{"prompt_tokens": 19, "completion_tokens": 2, "total_tokens": 21, '
    '"prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}, "completion_tokens_details": '
    '{"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}}\n\n'
    "data: [DONE]\n\n"
).encode()

OPENAI_CHAT_ANSWER = json.dumps(
    {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How can I assist you today?",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 10,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
    },
    indent=2,
).encode()

EVENT = re.compile(rb"data: ([^\r\n]*)\n\n")


def events_of(stream: bytes) -> list[Any]:
    """Each event's data, checking the bytes are `data: <one line>` and a blank line, and nothing else."""
    found = EVENT.findall(stream)
    assert b"".join(b"data: " + data + b"\n\n" for data in found) == stream
    assert found[-1] == b"[DONE]"
    assert b"[DONE]" not in found[:-1]
    return [json.loads(data) for data in found[:-1]]


def chat_stream(pieces: list[str], finish_reason: str, usage: dict[str, int] | None) -> bytes:
    """A stream as the model API writes one: a role chunk, a chunk per piece, the end, usage, [DONE]."""
    head = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": "SmolLM2-135M-Instruct",
        "system_fingerprint": "3f9a1c0d2b7e4a61",
    }

    def chunk(delta: dict[str, str], reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {**head, "choices": [choice], **({"usage": None} if usage else {})}

    chunks = [chunk({"role": "assistant", "content": ""}, None)]
    chunks += [chunk({"content": piece}, None) for piece in pieces]
    chunks.append(chunk({}, finish_reason))
    if usage:
        chunks.append({**head, "choices": [], "usage": usage})
    events = [json.dumps(payload, separators=(",", ":")) for payload in chunks] + ["[DONE]"]
    return "".join(f"data: {event}\n\n" for event in events).encode()


# The model API's own shapes, both ways, byte for byte


def test_a_model_api_chat_stream_becomes_the_answer_the_model_api_gives_unstreamed() -> None:
    assert stream_to_answer(MODEL_API_CHAT_STREAM, chat=True) == MODEL_API_CHAT_ANSWER


def test_a_model_api_chat_answer_becomes_the_stream_the_model_api_writes_in_one_chunk() -> None:
    stream = answer_to_stream(MODEL_API_CHAT_ANSWER, chat=True, include_usage=True)
    assert stream == MODEL_API_CHAT_STREAM_IN_ONE_CHUNK


def test_a_model_api_completion_stream_becomes_its_unstreamed_answer() -> None:
    assert stream_to_answer(MODEL_API_TEXT_STREAM, chat=False) == MODEL_API_TEXT_ANSWER


def test_a_model_api_completion_answer_becomes_a_text_chunk_an_end_and_usage() -> None:
    stream = answer_to_stream(MODEL_API_TEXT_ANSWER, chat=False, include_usage=True)
    assert stream is not None
    chunks = events_of(stream)
    assert [chunk["choices"] for chunk in chunks] == [
        [{"index": 0, "text": " is blue.", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}],
        [],
    ]
    assert all(chunk["object"] == "text_completion" and chunk["id"] == "cmpl-91b7" for chunk in chunks)
    assert chunks[-1]["usage"] == json.loads(TEXT_USAGE)
    assert stream_to_answer(stream, chat=False) == MODEL_API_TEXT_ANSWER


def test_without_include_usage_no_chunk_carries_a_usage_field() -> None:
    stream = answer_to_stream(MODEL_API_CHAT_ANSWER, chat=True, include_usage=False)
    assert stream is not None
    chunks = events_of(stream)
    assert len(chunks) == 3
    assert all("usage" not in chunk and len(chunk["choices"]) == 1 for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "A forward proxy café\n"}
    assert chunks[2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_an_empty_answer_streams_as_the_role_chunk_and_the_end() -> None:
    body = json.loads(MODEL_API_CHAT_ANSWER)
    body["choices"][0]["message"]["content"] = ""
    stream = answer_to_stream(json.dumps(body).encode(), chat=True, include_usage=True)
    assert stream is not None
    assert [chunk["choices"][:1] and chunk["choices"][0]["delta"] for chunk in events_of(stream)] == [
        {"role": "assistant", "content": ""},
        {},
        [],
    ]
    answer = stream_to_answer(stream, chat=True)
    assert answer is not None
    assert json.loads(answer)["choices"][0]["message"]["content"] == ""


# OpenAI's documented shapes, read by the openai SDK's own types


def test_an_openai_stream_keeps_its_service_tier_and_usage_details_and_drops_only_the_padding() -> None:
    answer = stream_to_answer(OPENAI_CHAT_STREAM, chat=True)
    assert answer is not None
    document = json.loads(answer)
    assert document["id"] == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
    assert document["created"] == 1741570283
    assert document["model"] == "gpt-4o-2024-08-06"
    assert document["service_tier"] == "default"
    assert document["system_fingerprint"] == "fp_eb9dce56a8"
    assert "obfuscation" not in document
    assert document["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert document["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_an_openai_answer_streams_with_its_header_fields_on_every_chunk() -> None:
    stream = answer_to_stream(OPENAI_CHAT_ANSWER, chat=True, include_usage=True)
    assert stream is not None
    chunks = events_of(stream)
    for chunk in chunks:
        assert (chunk["id"], chunk["created"], chunk["model"], chunk["service_tier"]) == (
            "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
            1741569952,
            "gpt-4.1-2025-04-14",
            "default",
        )
        assert "system_fingerprint" not in chunk  # absent in the answer: not invented
    assert chunks[-1]["usage"] == json.loads(OPENAI_CHAT_ANSWER)["usage"]


def test_the_openai_sdk_reads_both_conversions() -> None:
    chat = pytest.importorskip("openai.types.chat")
    completion_types = pytest.importorskip("openai.types")
    answer = stream_to_answer(OPENAI_CHAT_STREAM, chat=True)
    assert answer is not None
    whole = chat.ChatCompletion.model_validate_json(answer)
    assert whole.choices[0].message.content == "Hello!"
    stream = answer_to_stream(OPENAI_CHAT_ANSWER, chat=True, include_usage=True)
    assert stream is not None
    chunks = [chat.ChatCompletionChunk.model_validate(chunk) for chunk in events_of(stream)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello! How can I assist you today?"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 29
    text = stream_to_answer(MODEL_API_TEXT_STREAM, chat=False)
    assert text is not None
    assert completion_types.Completion.model_validate_json(text).choices[0].text == " is blue."


# Round trips


def test_stream_to_answer_to_stream_keeps_content_finish_reason_and_usage() -> None:
    answer = stream_to_answer(MODEL_API_CHAT_STREAM, chat=True)
    assert answer is not None
    stream = answer_to_stream(answer, chat=True, include_usage=True)
    assert stream is not None
    original, again = events_of(MODEL_API_CHAT_STREAM), events_of(stream)

    def content(chunks: list[Any]) -> str:
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    def finish(chunks: list[Any]) -> list[str]:
        return [
            c["choices"][0]["finish_reason"]
            for c in chunks
            if c["choices"] and c["choices"][0]["finish_reason"]
        ]

    assert content(again) == content(original) == "A forward proxy café\n"
    assert finish(again) == finish(original) == ["length"]
    assert again[-1]["usage"] == original[-1]["usage"]
    assert stream_to_answer(stream, chat=True) == answer


@given(
    pieces=st.lists(st.text(), max_size=8),
    finish_reason=st.sampled_from(["stop", "length", "content_filter"]),
    completion_tokens=st.integers(0, 4096),
)
def test_any_text_survives_both_round_trips(
    pieces: list[str], finish_reason: str, completion_tokens: int
) -> None:
    usage = {
        "prompt_tokens": 7,
        "completion_tokens": completion_tokens,
        "total_tokens": 7 + completion_tokens,
    }
    answer = stream_to_answer(chat_stream(pieces, finish_reason, usage), chat=True)
    assert answer is not None
    choice = json.loads(answer)["choices"][0]
    assert choice["message"]["content"] == "".join(pieces)
    assert choice["finish_reason"] == finish_reason
    assert json.loads(answer)["usage"] == usage
    stream = answer_to_stream(answer, chat=True, include_usage=True)
    assert stream is not None
    events_of(stream)
    assert stream_to_answer(stream, chat=True) == answer
    assert (
        stream_to_answer(answer_to_stream(answer, chat=True, include_usage=False) or b"", chat=True) is None
    )


# What the stream reader accepts of the SSE format


@pytest.mark.parametrize(
    "spell",
    [
        pytest.param(lambda s: s.replace(b"\n", b"\r\n"), id="CRLF line ends"),
        pytest.param(lambda s: s.replace(b"\n", b"\r"), id="CR line ends"),
        pytest.param(lambda s: s.replace(b"data: ", b"data:"), id="no space after data:"),
        pytest.param(lambda s: b": keep-alive\n\n" + s.replace(b"\n\n", b"\n\n: ping\n\n"), id="comments"),
        pytest.param(lambda s: s.removesuffix(b"\n\n"), id="no blank line after [DONE]"),
        pytest.param(lambda s: s.replace(b"data: {", b"event: message\ndata: {"), id="event named message"),
        pytest.param(lambda s: s.replace(b',"choices"', b',\ndata: "choices"'), id="data over two lines"),
    ],
)
def test_every_spelling_of_the_same_events_gives_the_same_answer(spell: Any) -> None:
    assert stream_to_answer(spell(MODEL_API_CHAT_STREAM), chat=True) == MODEL_API_CHAT_ANSWER


def test_a_stream_without_created_or_model_gives_an_answer_without_them() -> None:
    stream = (
        b'data: {"id":"chatcmpl-3","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\n'
        b'data: {"id":"chatcmpl-3","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
        b'data: {"id":"chatcmpl-3","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b'data: {"id":"chatcmpl-3","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    answer = stream_to_answer(stream, chat=True)
    assert answer is not None
    assert list(json.loads(answer)) == ["id", "object", "choices", "usage"]


# When a stream cannot become a whole answer


def change_event(stream: bytes, position: int, change: Any) -> bytes:
    """The stream with its `position`th event (0: the role chunk) changed by `change(chunk)`."""
    events = stream.split(b"\n\n")
    chunk = json.loads(events[position].removeprefix(b"data: "))
    change(chunk)
    events[position] = b"data: " + json.dumps(chunk).encode()
    return b"\n\n".join(events)


def in_delta(position: int, **fields: Any) -> Any:
    return lambda stream: change_event(stream, position, lambda c: c["choices"][0]["delta"].update(fields))


def in_choice(position: int, **fields: Any) -> Any:
    return lambda stream: change_event(stream, position, lambda c: c["choices"][0].update(fields))


def in_chunk(position: int, **fields: Any) -> Any:
    return lambda stream: change_event(stream, position, lambda c: c.update(fields))


def second_choice(stream: bytes) -> bytes:
    extra = {"index": 1, "delta": {"content": "B"}, "logprobs": None, "finish_reason": None}
    return change_event(stream, 2, lambda c: c["choices"].append(extra))


TOOL_CALL = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
LOGPROBS = {"content": [{"token": "A", "logprob": -0.1, "bytes": [65], "top_logprobs": []}], "refusal": None}

UNCONVERTIBLE_STREAMS = {
    "no usage chunk (include_usage was not asked)": lambda s: s.replace(
        f'data: {{{HEAD},"choices":[],"usage":{USAGE}}}\n\n'.encode(), b""
    ),
    "usage before the end": lambda s: change_event(s, 1, lambda c: c.update(usage=json.loads(USAGE))),
    "usage not an object": in_chunk(6, usage=35),
    "two choices in one chunk": second_choice,
    "a choice with index 1": in_choice(3, index=1),
    "an index that is true": in_choice(3, index=True),
    "tool calls": in_delta(2, tool_calls=TOOL_CALL),
    "a function call": in_delta(2, function_call={"name": "f", "arguments": "{}"}),
    "a refusal": in_delta(2, refusal="I can't help with that."),
    "audio": in_delta(2, audio={"id": "audio_1", "transcript": "A"}),
    "log probabilities": in_choice(1, logprobs=LOGPROBS),
    "a role other than the assistant's": in_delta(0, role="tool"),
    "content that is not text": in_delta(1, content=["A"]),
    "finish_reason tool_calls": in_choice(5, finish_reason="tool_calls"),
    "finish_reason not text": in_choice(5, finish_reason=1),
    "an unknown field with a value in a choice": in_choice(2, stop_reason=2),
    "an unknown field with a value in a chunk": in_chunk(2, citations=["https://example.org"]),
    "another id mid-stream": in_chunk(3, id="chatcmpl-other"),
    "another model mid-stream": in_chunk(3, model="other"),
    "a completion chunk in a chat stream": in_chunk(2, object="text_completion"),
    "content after the end": in_choice(3, finish_reason="stop"),
    "no finish_reason": in_choice(5, finish_reason=None),
    "no [DONE]": lambda s: s.removesuffix(b"data: [DONE]\n\n"),
    "cut mid-way": lambda s: s[: len(s) // 2],
    "[DONE] twice": lambda s: s + b"data: [DONE]\n\n",
    "an event after [DONE]": lambda s: s + s.split(b"\n\n")[1] + b"\n\n",
    "[DONE] in the middle": lambda s: s.replace(b"\n\n", b"\n\ndata: [DONE]\n\n", 1),
    "an unparsable event": lambda s: s.replace(b'{"content":"A"}', b'{"content":"A"'),
    "an event that is a JSON array": lambda s: s.replace(b"data: [DONE]", b"data: []\n\ndata: [DONE]"),
    "an error event": lambda s: s.replace(
        b"data: [DONE]", b'data: {"error":{"message":"boom"}}\n\ndata: [DONE]'
    ),
    "a named event": lambda s: s.replace(b"data: {", b"event: delta\ndata: {", 1),
    "bytes that are not UTF-8": lambda s: s.replace(b"proxy", b"pro\xffxy"),
    "nothing": lambda s: b"",
    "only [DONE]": lambda s: b"data: [DONE]\n\n",
}


@pytest.mark.parametrize("spoil", UNCONVERTIBLE_STREAMS.values(), ids=UNCONVERTIBLE_STREAMS.keys())
def test_a_stream_that_cannot_be_converted_faithfully_gives_none(spoil: Any) -> None:
    spoiled = spoil(MODEL_API_CHAT_STREAM)
    assert spoiled != MODEL_API_CHAT_STREAM
    assert stream_to_answer(spoiled, chat=True) is None


def test_a_stream_of_the_other_api_gives_none() -> None:
    assert stream_to_answer(MODEL_API_CHAT_STREAM, chat=False) is None
    assert stream_to_answer(MODEL_API_TEXT_STREAM, chat=True) is None


def test_a_completion_chunk_without_text_or_with_log_probabilities_gives_none() -> None:
    without_text = MODEL_API_TEXT_STREAM.replace(b'"text":" blue",', b"", 1)
    assert stream_to_answer(without_text, chat=False) is None
    with_logprobs = MODEL_API_TEXT_STREAM.replace(
        b'"text":" blue","logprobs":null', b'"text":" blue","logprobs":{"tokens":[" blue"]}', 1
    )
    assert stream_to_answer(with_logprobs, chat=False) is None


# When a whole answer cannot become a stream


def changed_answer(change: Any, body: bytes = MODEL_API_CHAT_ANSWER) -> bytes:
    document = json.loads(body)
    change(document)
    return json.dumps(document).encode()


def in_message(**fields: Any) -> Any:
    return lambda d: d["choices"][0]["message"].update(fields)


UNCONVERTIBLE_ANSWERS = {
    "two choices (n=2)": lambda d: d["choices"].append({**d["choices"][0], "index": 1}),
    "no choices": lambda d: d.update(choices=[]),
    "a choice with index 1": lambda d: d["choices"][0].update(index=1),
    "tool calls": in_message(content=None, tool_calls=TOOL_CALL),
    "tool calls beside text": in_message(tool_calls=TOOL_CALL),
    "a function call": in_message(function_call={"name": "f", "arguments": "{}"}),
    "a refusal": in_message(content=None, refusal="I can't help with that."),
    "audio": in_message(audio={"id": "audio_1", "data": "UklGR", "transcript": "A"}),
    "annotations": in_message(annotations=[{"type": "url_citation"}]),
    "no content": in_message(content=None),
    "a role other than the assistant's": in_message(role="user"),
    "log probabilities": lambda d: d["choices"][0].update(logprobs=LOGPROBS),
    "finish_reason tool_calls": lambda d: d["choices"][0].update(finish_reason="tool_calls"),
    "no finish_reason": lambda d: d["choices"][0].update(finish_reason=None),
    "an unknown field with a value": lambda d: d.update(prompt_filter_results=[{"prompt_index": 0}]),
    "a chunk, not an answer": lambda d: d.update(object="chat.completion.chunk"),
    "no usage (and include_usage)": lambda d: d.pop("usage"),
}


@pytest.mark.parametrize("spoil", UNCONVERTIBLE_ANSWERS.values(), ids=UNCONVERTIBLE_ANSWERS.keys())
def test_an_answer_that_cannot_be_converted_faithfully_gives_none(spoil: Any) -> None:
    assert answer_to_stream(changed_answer(spoil), chat=True, include_usage=True) is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"text"',
        b"{",
        b"\xff",
        b'{"error":{"message":"boom","type":"server_error"}}',
    ],
)
def test_a_body_that_is_not_a_json_object_gives_none(body: bytes) -> None:
    assert answer_to_stream(body, chat=True, include_usage=False) is None


def test_an_answer_without_usage_still_streams_when_usage_was_not_asked() -> None:
    body = changed_answer(lambda d: d.pop("usage"))
    assert answer_to_stream(body, chat=True, include_usage=False) is not None


def test_an_answer_of_the_other_api_gives_none() -> None:
    assert answer_to_stream(MODEL_API_CHAT_ANSWER, chat=False, include_usage=False) is None
    assert answer_to_stream(MODEL_API_TEXT_ANSWER, chat=True, include_usage=False) is None
    with_logprobs = changed_answer(
        lambda d: d["choices"][0].update(logprobs={"tokens": [" is"]}), MODEL_API_TEXT_ANSWER
    )
    assert answer_to_stream(with_logprobs, chat=False, include_usage=False) is None


# Which request fields share a key


def test_requests_that_differ_only_in_shape_share_their_content_fields() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "seed": 1}
    shapes = [
        base,
        {**base, "stream": False},
        {**base, "stream": True},
        {**base, "stream": True, "stream_options": {"include_usage": True}},
    ]
    assert all(content_key_fields(shape) == base for shape in shapes)
    assert content_key_fields({**base, "temperature": 1}) != content_key_fields(base)


def test_content_key_fields_leaves_the_request_alone() -> None:
    request = {"model": "m", "prompt": "Hi", "stream": True}
    content_key_fields(request)
    assert request == {"model": "m", "prompt": "Hi", "stream": True}


@pytest.mark.parametrize(
    ("request_document", "asked"),
    [
        ({"stream": True, "stream_options": {"include_usage": True}}, True),
        ({"stream": True, "stream_options": {"include_usage": False}}, False),
        ({"stream": True, "stream_options": {}}, False),
        ({"stream": True, "stream_options": None}, False),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, False),
        ({"stream": True}, False),
    ],
)
def test_usage_requested(request_document: dict[str, Any], asked: bool) -> None:
    assert usage_requested(request_document) is asked


def test_docstring_examples() -> None:
    assert doctest.testmod(streams).failed == 0
