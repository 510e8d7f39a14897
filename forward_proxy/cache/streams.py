"""A streamed answer of the OpenAI text generation API from a whole one, and a whole one from a stream.

A chat completion (or a completion) reaches a client in one of two shapes. With `stream` false it is one
JSON object (`chat.completion` or `text_completion`) holding the text, the `finish_reason` and the
`usage`. With `stream` true it is Server-Sent Events: chunks (`chat.completion.chunk`, or
`text_completion` again) whose pieces of text join into the same text, a last chunk with the
`finish_reason`, with `stream_options.include_usage` a chunk with no choices and the `usage`, then
`data: [DONE]`. The two fields `stream` and `stream_options` choose that shape and nothing else: the
model is asked the same thing either way (`content_key_fields`).

**When the content is the same.** A stored answer of one shape may answer a request for the other when
the proxy would answer that request from its cache at all (`generation.cacheable`: greedy, seeded, or a
client that accepts a stored sample with `max-age`), *and* the conversion neither loses nor invents
anything. So each function here returns None, and the request is a miss, rather than guess:

- a stream becomes a whole answer only when it is complete (a `finish_reason`, then `data: [DONE]`),
  every event reads as a chunk of the expected kind, it has one choice, its deltas hold nothing but
  the assistant's role and plain text (no tool or function calls, refusal, audio or log probabilities),
  and it carries `usage` (a whole answer always does; a stream has it only when its request asked with
  `stream_options.include_usage`);
- a whole answer becomes a stream only when it has one choice of plain text (the same exclusions), no
  log probabilities, and `usage` when the stream should end with it.

The id, `created`, `model`, `system_fingerprint` and `service_tier` carry over unchanged, so the client
sees the answer the model gave, in the shape it asked for. One difference remains and is harmless: a
stream made from a whole answer holds its text in one chunk, not token by token.

>>> whole = (
...     b'{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"smol",'
...     b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hi."},"logprobs":null,'
...     b'"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}'
... )
>>> stream = answer_to_stream(whole, chat=True, include_usage=True)
>>> stream.endswith(b"data: [DONE]\\n\\n")
True
>>> json.loads(stream_to_answer(stream, chat=True))["choices"][0]["message"]["content"]
'Hi.'

A stream whose request did not ask for usage cannot answer a request for a whole answer:

>>> print(stream_to_answer(answer_to_stream(whole, chat=True, include_usage=False), chat=True))
None
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

SHAPE_FIELDS = ("stream", "stream_options")
"""Request fields that choose the answer's shape (JSON or Server-Sent Events) and not its content."""

# Copied from one shape to the other, in the order the model API writes them.
_HEADER_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
_ANSWER_FIELDS = {*_HEADER_FIELDS, "object", "choices", "usage"}
# OpenAI pads stream chunks with random text against length side channels: it belongs to no answer.
_CHUNK_FIELDS = {*_ANSWER_FIELDS, "obfuscation"}
# finish_reason values that come only with tool or function calls, which are never converted.
_CALL_FINISHES = {"tool_calls", "function_call"}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_DONE = "[DONE]"


def content_key_fields(document: Mapping[str, Any]) -> dict[str, Any]:
    """The request without the fields that only choose its answer's shape (`SHAPE_FIELDS`).

    Two requests that differ only in `stream` and `stream_options` ask the model the same question, so
    they may share a cache key and one stored answer, converted by `stream_to_answer` or
    `answer_to_stream`. That is safe exactly when the model's content does not depend on streaming:
    requests the cache answers at all (greedy, or seeded where the server samples the same way in both
    shapes, as the model API does: both shapes read the same generation; or a client that accepts any
    stored sample with `max-age`). Keep a request's own `stream_options` to choose the shape it gets
    (`usage_requested`); a converter's None then means a miss, never an answer.

    >>> content_key_fields({"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    {'model': 'm'}
    """
    return {name: value for name, value in document.items() if name not in SHAPE_FIELDS}


def other_shapes(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The same request in the other shape: the requests whose stored answers may be converted into an
    answer to this one (`stream_to_answer`, `answer_to_stream`), the likeliest first.

    A streamed request may be answered from a whole answer, asked with `stream` absent or false; a whole
    one from a stream that carried usage, asked with `stream_options.include_usage`, or from one whose
    upstream sent usage unasked.

    >>> other_shapes({"model": "m", "stream": True})
    [{'model': 'm'}, {'model': 'm', 'stream': False}]
    >>> other_shapes({"model": "m"})[0]
    {'model': 'm', 'stream': True, 'stream_options': {'include_usage': True}}
    """
    content = content_key_fields(document)
    if document.get("stream") is True:
        return [content, {**content, "stream": False}]
    return [
        {**content, "stream": True, "stream_options": {"include_usage": True}},
        {**content, "stream": True},
    ]


def converted(
    content: bytes, stored_type: str, *, chat: bool, streamed: bool, include_usage: bool
) -> bytes | None:
    """A stored answer (`stored_type` its media type) in the shape a request asks for (`streamed`), or
    None when it is of that shape already or cannot be converted faithfully.

    >>> converted(b"{}", "application/json", chat=True, streamed=False, include_usage=False) is None
    True
    """
    stored_stream = stored_type.split(";", 1)[0].strip().lower() == "text/event-stream"
    if streamed == stored_stream:
        return None
    if streamed:
        return answer_to_stream(content, chat=chat, include_usage=include_usage)
    return stream_to_answer(content, chat=chat)


def usage_requested(document: Mapping[str, Any]) -> bool:
    """Whether a streamed request asks for the closing usage chunk (`stream_options.include_usage`).

    >>> usage_requested({"stream": True, "stream_options": {"include_usage": True}})
    True
    """
    options = document.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def stream_to_answer(events: bytes, *, chat: bool) -> bytes | None:
    """The JSON body a non-streamed request gets, from a stored complete stream of the same answer.

    `chat` says which API the stream came from (`chat.completion.chunk` or `text_completion` events).
    None when the stream cannot be converted faithfully (see the module's text).
    """
    chunks = _stream_chunks(events)
    if not chunks:
        return None
    header: dict[str, Any] = {}
    pieces: list[str] = []
    finish_reason: str | None = None
    usage: Any = None
    last = len(chunks) - 1
    for position, chunk in enumerate(chunks):
        if chunk.get("object") != _chunk_kind(chat) or not _adopt_header(header, chunk):
            return None
        if not _only_empty_beyond(chunk, _CHUNK_FIELDS):
            return None
        if chunk.get("usage") is not None:
            # The usage counts the whole answer: it comes last (OpenAI's and the model API's usage chunk).
            if position != last or not isinstance(chunk["usage"], dict):
                return None
            usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or len(choices) > 1:
            return None
        for choice in choices:
            piece = _delta_text(choice) if chat else _choice_text(choice)
            if piece is None or finish_reason is not None:  # nothing may follow a choice's end
                return None
            pieces.append(piece)
            reason = choice.get("finish_reason")
            if reason is not None:
                if not _plain_finish(reason):
                    return None
                finish_reason = reason
    if finish_reason is None or usage is None:
        return None
    text = "".join(pieces)
    content = {"message": {"role": "assistant", "content": text, "refusal": None}} if chat else {"text": text}
    whole = {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}
    answer = {**_envelope(header, _answer_kind(chat)), "choices": [whole], "usage": usage}
    # As FastAPI writes a response model: compact, UTF-8.
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()


def answer_to_stream(body: bytes, *, chat: bool, include_usage: bool) -> bytes | None:
    """The Server-Sent Events a streamed request gets, from a stored non-streamed answer.

    Chat: a first chunk with the role and empty content, one chunk with the whole text (none when it is
    empty), a last chunk with an empty delta and the `finish_reason`. Completions: the text chunk, then a
    chunk with empty text and the `finish_reason`. With `include_usage` every chunk carries
    `usage: null` and a chunk with no choices and the answer's `usage` follows; then `data: [DONE]`.
    None when the answer cannot be converted faithfully (see the module's text).
    """
    answer = _json_object(body)
    if answer is None or answer.get("object") != _answer_kind(chat):
        return None
    if not _only_empty_beyond(answer, _ANSWER_FIELDS):
        return None
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return None
    choice = choices[0]
    text = _message_text(choice) if chat else _choice_text(choice)
    if text is None or not _plain_finish(choice.get("finish_reason")):
        return None
    usage = answer.get("usage")
    if include_usage and not isinstance(usage, dict):
        return None
    envelope = _envelope({name: answer[name] for name in _HEADER_FIELDS if name in answer}, _chunk_kind(chat))

    def chunk(content: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        part = {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}
        payload = {**envelope, "choices": [part]}
        if include_usage:
            payload["usage"] = None
        return payload

    if chat:
        chunks = [chunk({"delta": {"role": "assistant", "content": ""}}, None)]
        if text:
            chunks.append(chunk({"delta": {"content": text}}, None))
        chunks.append(chunk({"delta": {}}, choice["finish_reason"]))
    else:
        chunks = [chunk({"text": text}, None)] if text else []
        chunks.append(chunk({"text": ""}, choice["finish_reason"]))
    if include_usage:
        chunks.append({**envelope, "choices": [], "usage": usage})
    # As the model API writes each event: `data: <compact JSON>` and a blank line.
    return b"".join(_event(json.dumps(payload, separators=(",", ":"))) for payload in chunks) + _event(_DONE)


# Reading the two shapes


def _stream_chunks(events: bytes) -> list[dict[str, Any]] | None:
    """The stream's JSON chunks, when it ends with `data: [DONE]` and every other event is a JSON object."""
    data = _event_data(events)
    if not data or data[-1] != _DONE:
        return None
    chunks = []
    for datum in data[:-1]:
        chunk = _json_object(datum.encode())
        if chunk is None:  # an unreadable event or a second [DONE]
            return None
        chunks.append(chunk)
    return chunks


def _event_data(events: bytes) -> list[str] | None:
    """The data of each Server-Sent Event, read as the HTML standard says (None when not UTF-8 or named).

    An event's `data:` lines join with line feeds; comments and `id:`/`retry:` fields are ignored. An
    event with a name other than `message` is not an API chunk. A last event not followed by a blank
    line still counts: its text is all there.
    """
    try:
        text = events.decode()
    except UnicodeDecodeError:
        return None
    found: list[str] = []
    lines: list[str] = []
    for line in [*_LINE_BREAK.split(text), ""]:
        if not line:
            if lines:
                found.append("\n".join(lines))
                lines = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            lines.append(value)
        elif field == "event" and value not in ("", "message"):
            return None
    return found


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _delta_text(choice: Any) -> str | None:
    """A chat chunk's text, when its delta holds nothing but the assistant's role and text."""
    delta = choice.get("delta") if _plain_choice(choice, "delta") else None
    if not isinstance(delta, dict) or delta.get("role") not in (None, "assistant"):
        return None
    return _text_of(delta, "content", required=False)


def _message_text(choice: Any) -> str | None:
    """A whole chat answer's text, when its message is the assistant's plain text."""
    message = choice.get("message") if _plain_choice(choice, "message") else None
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return None
    return _text_of(message, "content", required=True)


def _choice_text(choice: Any) -> str | None:
    """A completion's (or completion chunk's) text."""
    text = choice.get("text") if _plain_choice(choice, "text") else None
    return text if isinstance(text, str) else None


def _plain_choice(choice: Any, content: str) -> bool:
    """The one choice (index 0), without log probabilities or anything else beyond its content."""
    return (
        isinstance(choice, dict)
        and type(choice.get("index")) is int
        and choice["index"] == 0
        and choice.get("logprobs") is None
        and _only_empty_beyond(choice, {"index", content, "logprobs", "finish_reason"})
    )


def _text_of(holder: dict[str, Any], field: str, *, required: bool) -> str | None:
    """`holder[field]` when it is text and `holder` has nothing else but a role (absent text: "")."""
    text = holder.get(field)
    if not _only_empty_beyond(holder, {"role", field}):
        return None  # a refusal, tool or function calls, audio, annotations
    if text is None and not required:
        return ""
    return text if isinstance(text, str) else None


def _plain_finish(reason: Any) -> bool:
    return isinstance(reason, str) and reason not in _CALL_FINISHES


def _only_empty_beyond(document: dict[str, Any], known: set[str]) -> bool:
    """Whether every field outside `known` is null or empty: what conversion would drop says nothing."""
    return all(value in (None, [], {}) for name, value in document.items() if name not in known)


def _adopt_header(header: dict[str, Any], chunk: dict[str, Any]) -> bool:
    """Take the chunk's id, created, model... into `header`; False when one differs from an earlier chunk."""
    for name in _HEADER_FIELDS:
        if name in chunk:
            if name in header and header[name] != chunk[name]:
                return False
            header[name] = chunk[name]
    return True


# Writing them


def _chunk_kind(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"


def _answer_kind(chat: bool) -> str:
    return "chat.completion" if chat else "text_completion"


def _envelope(header: dict[str, Any], kind: str) -> dict[str, Any]:
    """The fields before `choices`, in the model API's order: id, object, created, model, fingerprint."""
    envelope = {name: header[name] for name in _HEADER_FIELDS[:1] if name in header}
    envelope["object"] = kind
    envelope.update((name, header[name]) for name in _HEADER_FIELDS[1:] if name in header)
    return envelope


def _event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()
