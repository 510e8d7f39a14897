"""KServe v2 request ids: an answer that only echoes the request's `id` is shared across ids.

The kserve SDK (and other clients) send a fresh `id` (a UUID) with every inference request, and a KServe
server writes that id back at the top of its answer and nowhere else. Keyed with the id, such requests
would never hit. So an infer request with a string `id` has a second, id-free key (its body without the
`id`); an answer is stored under that key only when it **echoes** the id: its top-level `id` is exactly the
request's, and the id appears nowhere else in the answer's JSON (no other string equals it, nor, for an
id of `DISTINCT_ID` characters or more such as a UUID, contains it). An upstream whose answer depends on
the id in any other way is keyed with the id, as before. A hit from the id-free entry gets the asker's own
id written back in (`with_id`). Batches answered row by row need none of this: rows never include the id.

Both KServe encodings are handled: JSON, and the binary tensor data extension (a JSON header of
`Inference-Header-Content-Length` bytes, then the raw tensors; the header length is rewritten with the id).

>>> body, _ = id_free(b'json:{"id":"a1","inputs":[]}', {"content-type": "application/json"})
>>> body
b'kserve-id-free:json:{"inputs":[]}'
>>> echoes(b'{"id": "a1", "outputs": []}', {}, "a1"), echoes(b'{"id": "a1", "x": "a1"}', {}, "a1")
(True, False)
>>> with_id(b'{"id":"a1","outputs":[]}', {}, "b2")
(b'{"id":"b2","outputs":[]}', None)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from forward_proxy.cache.canonical import canonical_json

HEADER_LENGTH = "inference-header-content-length"
ECHO_HEADER = "x-cache-echoes-id"  # on a stored entry: its answer echoes the request's id (never sent)
_INFER = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?/infer$")


def is_infer(path: str) -> bool:
    return bool(_INFER.match(path))


def _split(content: bytes, header: Mapping[str, str]) -> tuple[bytes, bytes] | None:
    """The JSON part and the binary rest of a KServe body (the rest is empty for plain JSON)."""
    length = header.get(HEADER_LENGTH)
    if length is None:
        return content, b""
    try:
        size = int(length)
    except ValueError:
        return None
    if not 0 <= size <= len(content):
        return None
    return content[:size], content[size:]


def _document(part: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(part)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def id_free(canonical: bytes, header: Mapping[str, str]) -> tuple[bytes, str] | None:
    """The bytes that key an infer request without its `id`, and the id; None when it has no string id
    (or is no KServe body). `canonical`: the request's canonical body (`canonical.canonical_body`: the
    JSON as keyed, or the decoded bytes); `header`: its headers, lower-case names."""
    kind, _, body = canonical.partition(b":")
    if kind not in (b"json", b"bytes"):
        return None
    parts = _split(body, header)
    document = _document(parts[0]) if parts is not None else None
    if parts is None or document is None or not isinstance(document.get("id"), str):
        return None
    request_id = document.pop("id")
    try:
        canonical = canonical_json(document)
    except (ValueError, RecursionError):
        return None
    binary = b":binary:" + parts[1] if parts[1] or HEADER_LENGTH in header else b""
    return b"kserve-id-free:json:" + canonical + binary, request_id


def echoes(content: bytes, header: Mapping[str, str], request_id: str) -> bool:
    """Whether an answer's JSON has `request_id` as its top-level `id` and nowhere else."""
    parts = _split(content, header)
    document = _document(parts[0]) if parts is not None else None
    if parts is None or document is None or document.get("id") != request_id:
        return False
    return _occurrences(document, request_id) == 1


DISTINCT_ID = 8  # an id this long is looked for inside other strings too; a shorter one only as a whole


def _occurrences(value: Any, text: str) -> int:
    """The strings of `value` (keys included) that are `text`, or contain it when it is distinctive."""
    if isinstance(value, str):
        return int(value == text or (len(text) >= DISTINCT_ID and text in value))
    if isinstance(value, dict):
        return sum(_occurrences(key, text) + _occurrences(item, text) for key, item in value.items())
    if isinstance(value, list):
        return sum(_occurrences(item, text) for item in value)
    return 0


def with_id(content: bytes, header: Mapping[str, str], request_id: str) -> tuple[bytes, str | None]:
    """`content` with its top-level `id` set to `request_id`, and the new `Inference-Header-Content-Length`
    for a binary answer (None for JSON). Content that is not such an answer comes back unchanged."""
    parts = _split(content, header)
    document = _document(parts[0]) if parts is not None else None
    if parts is None or document is None or "id" not in document or document["id"] == request_id:
        return content, None
    document["id"] = request_id
    part = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    return part + parts[1], (str(len(part)) if HEADER_LENGTH in header else None)
