"""Completions and chat completions (OpenAI-compatible): which are cached, and when a stream is whole.

A language model's answer is worth caching only when asking again would give the same answer. So a
request to `/v1/chat/completions` or `/v1/completions` is cached when it is **deterministic**: greedy
(`temperature` 0) or seeded (`seed` given), with one choice (`n` absent or 1). OpenAI's default
temperature is 1, so a request that names neither is sampled and passes through (`X-Cache: BYPASS`),
unless the client asks for it with `Cache-Control: max-age=N` (it then accepts a stored sample up to N
seconds old). Every body field that changes the answer is in the key already: the canonical JSON body.

A streamed answer (Server-Sent Events) is recorded as it passes to the client and kept only when it
completed: a chunk with a `finish_reason` and the closing `data: [DONE]`. A stream cut short, or one the
client left, is never stored.

>>> cacheable({"model": "m", "messages": [], "temperature": 0}, asked_max_age=False)
True
>>> cacheable({"model": "m", "messages": [], "seed": 7, "n": 2}, asked_max_age=False)
False
>>> cacheable({"model": "m", "messages": []}, asked_max_age=True)
True
>>> complete_stream(b'data: {"choices":[{"finish_reason":"stop"}]}\\n\\ndata: [DONE]\\n\\n')
True
>>> complete_stream(b'data: {"choices":[{"finish_reason":null}]}\\n\\n')
False
"""

from __future__ import annotations

import json
import re
from typing import Any

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
SAVED_TOKENS_HEADER = "x-cache-saved-tokens"
REPLAY_HEADER = (
    "x-cache-replay"  # `paced`: replay a streamed hit at the pace it first came (removed upstream)
)
PACING_HEADER = "x-cache-stream-pacing"  # on a stored stream: when its parts came (never sent)
MAX_PACED_PARTS = 4096
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
_DONE = re.compile(rb"(?m)^data: \[DONE\]\s*$")


def is_generation(path: str) -> bool:
    return path.endswith(GENERATION_PATHS)


def cacheable(document: Any, *, asked_max_age: bool) -> bool:
    """Whether a completion request may be answered from the cache (see the module's text)."""
    if not isinstance(document, dict):
        return False
    if asked_max_age:
        return True
    n = document.get("n")
    if n not in (None, 1):
        return False
    temperature = document.get("temperature", 1)
    greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    return greedy or document.get("seed") is not None


def complete_stream(content: bytes) -> bool:
    """Whether recorded Server-Sent Events hold a whole answer: a finish_reason, then `data: [DONE]`."""
    return bool(_FINISHED.search(content)) and bool(_DONE.search(content))


def completion_tokens(content: bytes, streamed: bool) -> int | None:
    """The tokens the model generated for a stored answer, as its `usage` says (None when it does not).

    >>> completion_tokens(b'{"usage": {"completion_tokens": 12}}', streamed=False)
    12
    """
    documents: list[Any] = []
    if streamed:
        for line in content.splitlines():
            if line.startswith(b"data: {"):
                try:
                    documents.append(json.loads(line[6:]))
                except ValueError:
                    continue
    else:
        try:
            documents.append(json.loads(content))
        except ValueError:
            return None
    for document in reversed(documents):
        usage = document.get("usage") if isinstance(document, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            return int(usage["completion_tokens"])
    return None


def pacing(arrivals: list[tuple[float, int]]) -> str:
    """When a stream's parts came, as stored with it: `milliseconds:bytes so far`, comma-separated; at most
    `MAX_PACED_PARTS` parts (a longer stream is paced in fewer, larger steps).

    >>> pacing([(0.0004, 10), (0.25, 30), (0.5, 42)])
    '0:10,250:30,500:42'
    """
    step = -(-len(arrivals) // MAX_PACED_PARTS)
    kept = arrivals[step - 1 :: step]
    if kept[-1] != arrivals[-1]:
        kept.append(arrivals[-1])
    return ",".join(f"{round(seconds * 1000)}:{size}" for seconds, size in kept)


def paced_parts(content: bytes, timing: str) -> list[tuple[float, bytes]]:
    """`content` cut where the stored `pacing` says, each part with the second it is due; the whole content
    at once when the timing does not fit it.

    >>> paced_parts(b"abcdef", "0:2,250:6")
    [(0.0, b'ab'), (0.25, b'cdef')]
    >>> paced_parts(b"abc", "garbled")
    [(0.0, b'abc')]
    """
    parts: list[tuple[float, bytes]] = []
    start = 0
    try:
        for item in timing.split(","):
            milliseconds, _, size = item.partition(":")
            end = int(size)
            if end == start:
                continue
            if not start < end <= len(content):
                raise ValueError(item)
            parts.append((int(milliseconds) / 1000, content[start:end]))
            start = end
    except ValueError:
        return [(0.0, content)]
    if start < len(content):
        parts.append((parts[-1][0] if parts else 0.0, content[start:]))
    return parts
