"""The cache's two decisions, as pure code over plain data (no I/O, no mitmproxy):

- `sort_entries`: given the rows of a request and what the store holds for them, which rows are served
  from the store (`found`), which may stand in if the upstream fails (`stale`) and which must be asked
  (`missing`). A whole request is the one-row case.
- `unstorable`: whether an upstream answer may be stored, and so shared with identical requests that
  waited for it (sharing follows storing: a waiter gets exactly what a later request would get from the
  store). Every line of a repeated header counts (`Cache-Control: private` on one line and
  `max-age=600` on another is private).

>>> unstorable(200, [(b"cache-control", b"max-age=600"), (b"cache-control", b"private")], b"{}",
...            statuses={200}, max_entry_size=1024, keyed_headers=("host",))
'Cache-Control: private'
>>> unstorable(200, [(b"content-type", b"application/json")], b'{"error": {"message": "quota"}}',
...            statuses={200}, max_entry_size=1024, keyed_headers=("host",))
'an error answer (a JSON object with "error")'
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from forward_proxy.cache.policy import (
    RequestDirectives,
    Usability,
    parse_cache_control,
    response_lifetime,
    unparsable_json,
    unstorable_reason,
    usability,
)
from forward_proxy.cache.rows import Batch, RowAnswer
from forward_proxy.store.base import Entry

USAGE_HEADER = "x-cache-usage"  # on stored rows: "estimated" when the row's token count is a share
ROW_TOKENS_HEADER = "x-cache-row-tokens"  # on stored OpenAI rows: the row's prompt tokens


@dataclass(frozen=True)
class Stored:
    answer: RowAnswer
    entry: Entry


@dataclass
class Lookup:
    found: dict[str, Stored] = field(default_factory=dict)  # served from the store
    stale: dict[str, Stored] = field(default_factory=dict)  # stand in only if the upstream fails
    missing: list[str] = field(default_factory=list)  # distinct row keys to ask, in the client's order
    borrowed: dict[str, RowAnswer] = field(default_factory=dict)  # missing rows other requests asked
    ready: set[str] = field(default_factory=set)  # borrowed rows that were answered before this request


def joined_headers(fields: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header fields by lower-case name, repeated lines joined with ", " (RFC 9110, 5.3)."""
    header: dict[str, str] = {}
    for name, value in fields:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        header[key] = f"{header[key]}, {text}" if key in header else text
    return header


def entry_header(entry: Entry, name: str) -> str | None:
    values = [value for key, value in entry.headers if key == name]
    return ", ".join(values) if values else None


def sort_entries(
    batch: Batch,
    keys: Sequence[str],
    entries: Mapping[str, Entry | None],
    *,
    now: float,
    directives: RequestDirectives,
    ttl: float,
    stale_if_error: float,
    version: str | None,
    confirmed: bool,
) -> Lookup:
    """Sort the rows of `batch` (stored under `keys`, one per row) by what `entries` holds for them.

    An entry is served fresh only when the origin's version is `confirmed` current (or the request
    insists on `only-if-cached`); an entry of another version is never used, not even as stale."""
    lookup = Lookup()
    for key in dict.fromkeys(keys):
        entry = entries.get(key)
        answer = (
            batch.load_answer(
                entry.content,
                entry_header(entry, USAGE_HEADER) == "estimated",
                _number(entry_header(entry, ROW_TOKENS_HEADER)),
            )
            if entry is not None
            else None
        )
        if entry is None or answer is None:
            lookup.missing.append(key)
            continue
        use = usability(
            entry,
            now=now,
            lifetime=response_lifetime(entry_header(entry, "cache-control"), ttl),
            max_age=directives.max_age,
            stale_if_error=stale_if_error,
            current_version=version,
        )
        if use is Usability.FRESH and (confirmed or directives.only_if_cached):
            lookup.found[key] = Stored(answer, entry)
            continue
        if use is not Usability.UNUSABLE:
            lookup.stale[key] = Stored(answer, entry)
        lookup.missing.append(key)
    return lookup


def _number(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def unstorable(
    status: int,
    fields: Sequence[tuple[bytes, bytes]],
    content: bytes,
    *,
    statuses: Collection[int],
    max_entry_size: int,
    keyed_headers: Collection[str],
    whole_stream: bool = False,
) -> str | None:
    """Why an upstream answer must be neither stored nor shared, or None when it may be both.
    `whole_stream`: a completion's Server-Sent Events, recorded whole (`generation.complete_stream`)."""
    header = joined_headers(fields)
    reason = unstorable_reason(
        status, header, len(content), statuses, max_entry_size, keyed_headers, whole_stream=whole_stream
    )
    if reason is not None:
        return reason
    if unparsable_json(header, content):
        return "a JSON answer whose body does not parse"
    if _error_document(header, content):
        return 'an error answer (a JSON object with "error")'
    return None


def expire_seconds(entry: Entry, ttl: float, stale_if_error: float) -> float:
    """How long the store keeps `entry`: its lifetime, then the stale-if-error window."""
    return response_lifetime(entry_header(entry, "cache-control"), ttl) + stale_if_error


def private(fields: Sequence[tuple[bytes, bytes]]) -> bool:
    return "private" in parse_cache_control(joined_headers(fields).get("cache-control"))


def _error_document(header: Mapping[str, str], content: bytes) -> bool:
    """A successful status whose JSON body is an error object, as OpenAI-compatible servers and gateways
    send with 200 (`{"error": {...}}`) or KServe (`{"error": "..."}`)."""
    media = header.get("content-type", "").split(";", 1)[0].strip().lower()
    if (media != "application/json" and not media.endswith("+json")) or not content.lstrip().startswith(b"{"):
        return False
    if header.get("content-encoding", "identity").strip().lower() != "identity":
        return False
    if b'"error"' not in content:
        return False
    try:
        document = json.loads(content)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("error") not in (None, False)
