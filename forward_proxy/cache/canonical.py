"""Request bodies and queries in canonical form, so that requests meaning the same share a cache key.

JSON bodies are parsed and written back with sorted keys and no insignificant whitespace; fields the
user chose to ignore (dotted paths such as `request_id` or `metadata.trace`) are left out. Compressed
bodies (gzip, deflate, br) are decoded first. Anything else is keyed by its bytes, and so is JSON
that parsers may read differently (an object repeating a name) or that cannot be written back (lone
surrogates, nesting past Python's recursion limit).

>>> canonical_body(b'{ "input": "hi",  "model": "m" }', "application/json", None, ()).data
b'json:{"input":"hi","model":"m"}'
>>> canonical_query("b=2&a=1&a=0")
'a=1&a=0&b=2'
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import brotli

MAX_CODINGS = 1  # content codings undone at most: `gzip, gzip` is a decompression bomb's shape
UNLIMITED = 1 << 62


class BodyTooLarge(ValueError):
    """A request body that would decode past the limit, or with more codings than `MAX_CODINGS`: it is
    never decoded further (the cache forwards it untouched and keeps nothing)."""


def _zlib(data: bytes, wbits: int, limit: int) -> bytes:
    decoder = zlib.decompressobj(wbits)
    out = decoder.decompress(data, limit + 1)
    if len(out) > limit or decoder.unconsumed_tail:
        raise BodyTooLarge(f"the body decodes to more than {limit} bytes")
    return out


def _inflate(data: bytes, limit: int) -> bytes:
    try:
        return _zlib(data, zlib.MAX_WBITS, limit)  # RFC 9110 "deflate": zlib-wrapped
    except zlib.error:
        return _zlib(data, -zlib.MAX_WBITS, limit)  # what some clients send: raw deflate


def _brotli(data: bytes, limit: int) -> bytes:
    decoder = brotli.Decompressor()
    out = decoder.process(data, output_buffer_limit=limit + 1)
    if len(out) > limit or not decoder.can_accept_more_data():
        raise BodyTooLarge(f"the body decodes to more than {limit} bytes")
    if not decoder.is_finished():
        raise ValueError("a brotli body that ends early")
    return bytes(out)


_DECODERS = {
    "gzip": lambda data, limit: _zlib(data, 16 + zlib.MAX_WBITS, limit),
    "x-gzip": lambda data, limit: _zlib(data, 16 + zlib.MAX_WBITS, limit),
    "deflate": _inflate,
    "br": _brotli,
    "identity": lambda data, limit: data,
}


@dataclass(frozen=True)
class CanonicalBody:
    data: bytes  # the bytes the key is built from
    document: Any  # the parsed JSON document (before ignored fields were dropped), or None


def decode_body(raw: bytes, content_encoding: str | None, limit: int = UNLIMITED) -> bytes:
    """`raw` with its Content-Encoding undone (codings applied last are undone first), at most
    `MAX_CODINGS` of them and `limit` bytes of output (`BodyTooLarge` past either, as soon as it shows).

    >>> import gzip
    >>> try:
    ...     decode_body(gzip.compress(b"x" * 100), "gzip", limit=10)
    ... except BodyTooLarge as exc:
    ...     print(exc)
    the body decodes to more than 10 bytes
    """
    if not content_encoding:
        if len(raw) > limit:
            raise BodyTooLarge(f"the body is more than {limit} bytes")
        return raw
    codings = [part.strip().lower() for part in content_encoding.split(",") if part.strip()]
    codings = [coding for coding in codings if coding != "identity"]
    if len(codings) > MAX_CODINGS:
        raise BodyTooLarge(
            f"{len(codings)} content codings ({content_encoding}); at most {MAX_CODINGS} is undone"
        )
    data = raw
    for coding in reversed(codings):
        decoder = _DECODERS.get(coding)
        if decoder is None:
            raise ValueError(f"unknown content coding {coding!r}")
        data = decoder(data, limit)
    if len(data) > limit:
        raise BodyTooLarge(f"the body is more than {limit} bytes")
    return data


def is_json_type(content_type: str | None) -> bool:
    if not content_type:
        return True  # many clients post JSON without saying so; a failed parse falls back to bytes
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a name repeats: parsers disagree on which value counts (Python's the
    last, others the first), so `{"input": "a", "input": "b"}` must not share the entry of either."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a JSON object repeats a name")
    return document


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def drop_fields(document: Any, paths: Sequence[str]) -> Any:
    """A copy of `document` without the dotted `paths` (only objects are descended into)."""
    if not paths or not isinstance(document, dict):
        return document
    here = {path for path in paths if "." not in path}
    deeper: dict[str, list[str]] = {}
    for path in paths:
        if "." in path:
            head, rest = path.split(".", 1)
            deeper.setdefault(head, []).append(rest)
    return {
        name: drop_fields(value, deeper[name]) if name in deeper else value
        for name, value in document.items()
        if name not in here
    }


def json_body(document: Any, ignore_fields: Sequence[str]) -> bytes:
    """The canonical bytes of a parsed JSON body: what `canonical_body` keys a JSON request by.

    >>> json_body({"b": 1, "a": {"x": 2, "y": 3}}, ["a.y"])
    b'json:{"a":{"x":2},"b":1}'
    """
    return b"json:" + canonical_json(drop_fields(document, ignore_fields))


def canonical_body(
    raw: bytes,
    content_type: str | None,
    content_encoding: str | None,
    ignore_fields: Sequence[str],
    limit: int = UNLIMITED,
) -> CanonicalBody:
    """The canonical bytes of a request body. Undecodable bodies are keyed by their raw bytes plus coding;
    a body past `limit` raises `BodyTooLarge`."""
    try:
        data = decode_body(raw, content_encoding, limit)
    except BodyTooLarge:
        raise
    except (ValueError, OSError, EOFError, zlib.error, brotli.error):
        return CanonicalBody(b"undecodable:" + (content_encoding or "").encode() + b":" + raw, None)
    if data and is_json_type(content_type):
        try:
            document = json.loads(data, object_pairs_hook=_object_without_duplicates)
            canonical = json_body(document, ignore_fields)
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass  # not JSON, ambiguous, or nested past Python's recursion limit: keyed by its bytes
        else:
            return CanonicalBody(canonical, document)
    return CanonicalBody(b"bytes:" + data, None)


def canonical_query(query: str) -> str:
    """The query with its parameters sorted by name, consistently percent-encoded. The values of a
    repeated name keep their order: `?x=2&x=1` is another request than `?x=1&x=2` (a list, for most
    servers), while `?a=1&b=2` and `?b=2&a=1` mean the same."""
    if not query:
        return ""
    # surrogateescape: percent-escapes that are not UTF-8 (%ff, %fe) stay distinct instead of all
    # turning into U+FFFD, which would let different requests share an entry.
    pairs = parse_qsl(query, keep_blank_values=True, errors="surrogateescape")
    return urlencode(sorted(pairs, key=lambda pair: pair[0]), errors="surrogateescape")
