"""Fuzzing the request canonicaliser and the key builder (hypothesis): whatever a client sends, they
never raise, and requests that mean different things never get the same key.

`tests/forward_proxy/cache/test_keys.py` shows that equivalent requests share a key; this file attacks
the other direction and the edges: arbitrary bytes, encodings, JSON nested past the recursion limit,
lone surrogates, non-UTF-8 percent-escapes, and every key field against every other."""

from __future__ import annotations

import json
import logging
import string
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from forward_proxy.cache.canonical import BodyTooLarge, canonical_body, canonical_query
from forward_proxy.cache.keys import KEY_HEADERS, KeyParts, cache_key, key_headers, key_id, partition

pytestmark = pytest.mark.reliability

SECRET = b"f" * 32
PREFIXES = (b"json:", b"bytes:", b"undecodable:")
CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", "x+json", ""]),
    st.text(max_size=30),
)
ENCODINGS = st.one_of(
    st.none(),
    st.sampled_from(["gzip", "deflate", "br", "identity", "gzip, br", "x-gzip", "compress", ", ,"]),
    st.text(max_size=20),
)
# Text as a client can put it in JSON: any code point, lone surrogates included (via \\u escapes).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=25,
)
ignore_paths = st.lists(st.text(string.ascii_lowercase + ".", min_size=1, max_size=8), max_size=3)


def meaning(raw: bytes) -> tuple[str, Any]:
    """What a JSON body says, independent of spacing and member order but not of repeated names (which
    parsers read differently); the bytes when it is not JSON."""

    def members(pairs: list[tuple[str, Any]]) -> tuple[str, list[tuple[str, Any]]]:
        return "object", sorted(pairs, key=repr)

    try:
        return "json", repr(json.loads(raw, object_pairs_hook=members))
    except (ValueError, RecursionError):
        return "bytes", raw


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), CONTENT_TYPES, ENCODINGS, ignore_paths)
@example(b'{"a": "\\ud800"}', "application/json", None, [])  # regression: crashed writing UTF-8
@example(b"[" * 100_000 + b"]" * 100_000, None, None, [])  # regression: RecursionError
@example(b"\x1f\x8b\x08\x00garbage", "application/json", "gzip", [])
def test_the_canonicaliser_never_raises_and_is_deterministic(
    raw: bytes, content_type: str | None, encoding: str | None, ignore: list[str]
) -> None:
    try:
        first = canonical_body(raw, content_type, encoding, ignore)
    except BodyTooLarge:  # two codings: a bomb's shape, never undone (the cache forwards it untouched)
        assert encoding is not None and "," in encoding
        return
    assert first.data.startswith(PREFIXES)
    assert canonical_body(raw, content_type, encoding, ignore) == first


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from([None, 0, 2]), st.booleans())
def test_any_json_document_is_keyed_by_what_it_says(
    document: Any, indent: int | None, ascii_only: bool
) -> None:
    raw = json.dumps(document, indent=indent, ensure_ascii=ascii_only, separators=None).encode(
        "utf-8", "surrogatepass"
    )
    body = canonical_body(raw, "application/json", None, ())
    if body.data.startswith(b"json:"):
        assert json.loads(body.data[5:]) == document
    else:  # a lone surrogate cannot be written back as UTF-8: the body's own bytes are the key
        assert body.data == b"bytes:" + raw and body.document is None


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 20_000), st.sampled_from(["[", '{"a":']))
def test_json_nested_past_the_recursion_limit_never_raises(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    raw = (opener * depth + "1" + closer * depth).encode()
    body = canonical_body(raw, "application/json", None, ("a.a",))
    assert body.data.startswith((b"json:", b"bytes:"))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40), CONTENT_TYPES)
@example(b'{"input": "\xff"}', b'{"input": "\xfe"}', "application/json")
@example(b'{"input": "\xff"}', '{"input": "\ufffd"}'.encode(), "application/json")
@example(b'{"a": 1}', b'{"a": 1.0}', "application/json")
@example(b'{"a": 1}', b'{"a": true}', "application/json")
@example(b"json:{}", b"{}", "application/json")
@example(b'{"input": "a", "input": "b"}', b'{"input": "b"}', "application/json")  # first-wins parsers
def test_bodies_that_mean_different_things_never_share_a_key(
    one: bytes, other: bytes, content_type: str | None
) -> None:
    first = canonical_body(one, content_type, None, ()).data
    second = canonical_body(other, content_type, None, ()).data
    if first == second:
        assert meaning(one) == meaning(other), (one, other)


# --- every key field against every other ------------------------------------------------------------

tokens = st.text(string.ascii_letters + string.digits + "-.", min_size=1, max_size=10)
latin1 = st.text(st.characters(max_codepoint=255, exclude_characters="\r\n"), max_size=12)
key_parts = st.builds(
    KeyParts,
    method=st.sampled_from(["POST", "GET", "PUT"]),
    scheme=st.sampled_from(["http", "https"]),
    host=st.text(string.ascii_lowercase + string.digits + ".-", min_size=1, max_size=12),
    port=st.integers(1, 65535),
    # mitmproxy keeps non-UTF-8 path bytes as the surrogates U+DC80-U+DCFF (surrogateescape)
    path=st.text(
        st.characters(codec="utf-8") | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
        max_size=16,
    ),
    query=st.text(max_size=12),
    body=st.binary(max_size=24),
    headers=st.tuples(*(st.tuples(st.just(name), latin1) for name in (*KEY_HEADERS, "x-lang"))),
    partition=st.one_of(st.just(""), st.text(string.hexdigits, min_size=1, max_size=8)),
    namespace=latin1,
    version=st.one_of(st.none(), latin1),
)


def normalised(parts: KeyParts) -> tuple[Any, ...]:
    """The fields as the key sees them: method, scheme and host are case-insensitive."""
    fields = dict(vars(parts))
    fields.update(method=parts.method.upper(), scheme=parts.scheme.lower(), host=parts.host.lower())
    return tuple(fields.values())


@settings(max_examples=500, deadline=None)
@given(key_parts, key_parts)
def test_distinct_key_parts_give_distinct_keys(one: KeyParts, other: KeyParts) -> None:
    if normalised(one) != normalised(other):
        assert cache_key(one, SECRET) != cache_key(other, SECRET)
    else:
        assert cache_key(one, SECRET) == cache_key(other, SECRET)


@settings(max_examples=200, deadline=None)
@given(key_parts, st.sampled_from(list(KeyParts.__dataclass_fields__)), st.data())
def test_changing_any_one_field_changes_the_key(parts: KeyParts, field: str, data: st.DataObject) -> None:
    changed = data.draw(key_parts)
    mixed = KeyParts(**{**vars(parts), field: getattr(changed, field)})
    if normalised(mixed) != normalised(parts):
        assert cache_key(mixed, SECRET) != cache_key(parts, SECRET)
    assert len(key_id(cache_key(mixed, SECRET))) == 16


def query_of(pairs: list[tuple[bytes, bytes]]) -> str:
    return "&".join(f"{quote_from_bytes(name)}={quote_from_bytes(value)}" for name, value in pairs)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=4), st.binary(max_size=4)), max_size=4),
    st.lists(st.tuples(st.binary(min_size=1, max_size=4), st.binary(max_size=4)), max_size=4),
    st.randoms(),
)
@example([(b"a", b"\xff")], [(b"a", b"\xfe")], None)  # regression: both became a=%EF%BF%BD
def test_queries_with_other_bytes_never_share_a_key(
    one: list[tuple[bytes, bytes]], other: list[tuple[bytes, bytes]], random: Any
) -> None:
    # Parameters of different names may come in any order; a repeated name's values keep theirs.
    names = list(dict.fromkeys(name for name, _ in one))
    if random is not None:
        random.shuffle(names)
    shuffled = [pair for name in names for pair in one if pair[0] == name]
    assert canonical_query(query_of(one)) == canonical_query(query_of(shuffled))

    def by_name(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return sorted(pairs, key=lambda pair: pair[0].decode("utf-8", "surrogateescape"))

    same = by_name(one) == by_name(other)
    assert (canonical_query(query_of(one)) == canonical_query(query_of(other))) == same


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_query_text_is_canonicalised_without_raising(query: str) -> None:
    canonical = canonical_query(query)
    assert canonical == canonical_query(canonical)  # idempotent
    canonical.encode("ascii")  # safe to key and to send


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["authorization", "x-api-key", "x-tenant"]), latin1, max_size=3),
    st.dictionaries(st.sampled_from(["authorization", "x-api-key", "x-tenant"]), latin1, max_size=3),
    st.sampled_from(["X-Tenant", "x-tenant", "X-TENANT"]),
)
def test_different_credentials_never_share_a_partition(
    one: dict[str, str], other: dict[str, str], spelling: str
) -> None:
    first = partition(one.get, (spelling,), SECRET)
    second = partition(other.get, ("x-tenant",), SECRET)
    assert (first == second) == (one == other)
    assert (first == "") == (not one)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=6), st.lists(tokens, max_size=3))
def test_key_headers_never_raise(headers: dict[str, str], extra: list[str]) -> None:
    chosen = key_headers(headers.get, extra)
    assert [name for name, _ in chosen][:3] == list(KEY_HEADERS)


# --- the whole request path of the cache addon --------------------------------------------------------

TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
header_names = st.one_of(
    st.sampled_from(["content-type", "content-encoding", "authorization", "x-cache-namespace", "accept"]),
    st.sampled_from(["cache-control", "pragma", "host", "x-api-key", "transfer-encoding", "expect"]),
    st.text(TOKEN, min_size=1, max_size=8),
)
# What mitmproxy's parser lets through in a value: anything but CR and LF.
header_values = st.binary(max_size=16).map(lambda value: value.replace(b"\r", b"").replace(b"\n", b""))
path_segments = st.binary(min_size=1, max_size=8).filter(lambda segment: not set(segment) & set(b"/?# \r\n"))


def test_the_cache_addon_answers_any_request_without_raising(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Arbitrary paths (non-UTF-8 bytes included), queries, headers and bodies through `Cache.request`
    with a real store and a fake upstream: the hook never raises, every request a rule matches gets an
    answer with an X-Cache decision, and the counters still add up and can still be written.

    Regression: a non-UTF-8 byte in a KServe model name became a counter label the store could not
    encode, and from then on no count of the process reached the shared counters (/stats)."""

    from mitmproxy import http
    from mitmproxy.flow import Error
    from mitmproxy.test import taddons, tflow

    from forward_proxy.cache.addon import Cache
    from forward_proxy.cache.record import RECORD, Decision

    cache = Cache()
    with taddons.context(cache) as context:
        loop = context.master.event_loop
        # No version checks: nothing may answer them, and whatever listens on that port must not matter.
        context.configure(
            cache, cache_dir=str(tmp_path_factory.mktemp("fuzz-cache")), version_check_interval="0"
        )

        async def start() -> None:
            cache.running()

        loop.run_until_complete(start())

        @settings(max_examples=250, deadline=None)
        @given(
            path_segments,
            st.binary(max_size=12),
            st.lists(st.tuples(header_names, header_values), max_size=6),
            st.binary(max_size=40) | json_values.map(lambda document: json.dumps(document).encode()),
        )
        @example(b"\xff", b"", [], b'{"input": "\\ud800"}')
        @example(b"x", b"a=%ff", [("x-bad", b"a\x00b")], b"[" * 3000 + b"]" * 3000)
        def check(segment: bytes, query: bytes, headers: list[tuple[str, bytes]], body: bytes) -> None:
            target = b"/v2/models/" + segment + b"/infer" + (b"?" + query if query else b"")
            fields = [(name.encode(), value) for name, value in headers]
            request = http.Request(
                "127.0.0.1",
                8000,
                b"POST",
                b"http",
                b"",
                target,
                b"HTTP/1.1",
                http.Headers(fields),
                body,
                None,
                0,
                0,
            )
            flow = tflow.tflow(req=request)
            loop.run_until_complete(cache.request(flow))
            if flow.response is None and RECORD in flow.metadata and flow.metadata[RECORD].decision is None:
                # this flow leads: mitmproxy would forward it; here the upstream is unreachable
                flow.error = Error("Connection refused")
                loop.run_until_complete(cache.error(flow))
            loop.run_until_complete(cache.settled())
            if RECORD in flow.metadata:
                decision = flow.metadata[RECORD].decision
                assert decision is not None
                assert flow.response is not None or flow.error is not None or decision is Decision.BYPASS

        try:
            check()
        finally:
            cache.done()
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    snapshot = cache.counters.snapshot()
    decisions = ("hits", "misses", "partials", "bypasses", "refreshes", "coalesced", "stale")
    assert snapshot.total("requests") == sum(snapshot.total(name) for name in decisions) > 0
