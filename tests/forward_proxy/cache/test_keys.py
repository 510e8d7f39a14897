"""Canonical request form and cache keys: same meaning → same key; any change that matters → another key."""

from __future__ import annotations

import dataclasses
import gzip
import json
import zlib
from typing import Any

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forward_proxy.cache.canonical import (
    BodyTooLarge,
    canonical_body,
    canonical_query,
    decode_body,
    drop_fields,
)
from forward_proxy.cache.keys import KeyParts, cache_key, key_headers, key_id, partition

SECRET = b"s" * 32

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=6)


def key_of(document: Any, *, body: bytes | None = None, **changes: Any) -> str:
    data = body if body is not None else json.dumps(document).encode()
    canonical = canonical_body(data, "application/json", None, ()).data
    parts = KeyParts(
        method="POST",
        scheme="http",
        host="127.0.0.1",
        port=8000,
        path="/v1/embeddings",
        query="",
        body=canonical,
        headers=(("content-type", "application/json"), ("accept", "")),
        partition="",
        namespace="",
        version="v1",
    )
    return cache_key(dataclasses.replace(parts, **changes), SECRET)


def shuffled_dumps(document: Any, draw_order: list[int], indent: int | None) -> str:
    """`document` as JSON with its object keys in another order and other whitespace."""

    def reorder(value: Any) -> Any:
        if isinstance(value, dict):
            items = list(value.items())
            if items:
                shift = draw_order[len(items) % len(draw_order)] % len(items)
                items = items[shift:] + items[:shift]
            return {name: reorder(item) for name, item in reversed(items)}
        if isinstance(value, list):
            return [reorder(item) for item in value]
        return value

    return json.dumps(
        reorder(document), indent=indent, separators=(" , ", " :  ") if indent is None else None
    )


@settings(max_examples=200, deadline=None)
@given(json_objects, st.lists(st.integers(0, 10), min_size=1, max_size=5), st.sampled_from([None, 0, 2]))
def test_reordered_or_respaced_json_gives_the_same_key(
    document: Any, order: list[int], indent: int | None
) -> None:
    respaced = shuffled_dumps(document, order, indent).encode()
    assert key_of(document) == key_of(None, body=respaced)


@settings(max_examples=200, deadline=None)
@given(json_objects, st.text(min_size=1), json_values)
def test_changing_a_value_gives_another_key(document: dict[str, Any], name: str, value: Any) -> None:
    changed = {**document, name: value}
    if changed == document or json.dumps(changed, sort_keys=True) == json.dumps(document, sort_keys=True):
        return
    assert key_of(document) != key_of(changed)


@pytest.mark.parametrize(
    "change",
    [
        {"method": "PUT"},
        {"scheme": "https"},
        {"host": "127.0.0.2"},
        {"port": 8001},
        {"path": "/v1/embeddings/x"},
        {"query": "a=1"},
        {"headers": (("content-type", "application/json"), ("accept", "text/csv"))},
        {"partition": "tenant-b"},
        {"namespace": "experiment"},
        {"version": "v2"},
        {"version": None},
    ],
)
def test_any_other_request_property_gives_another_key(change: dict[str, Any]) -> None:
    assert key_of({"input": "hi"}) != key_of({"input": "hi"}, **change)


@given(
    st.sampled_from(["Bearer a", "Bearer b", "Bearer c"]),
    st.sampled_from(["Bearer a", "Bearer b", "Bearer c"]),
)
def test_credentials_partition_the_cache(first: str, second: str) -> None:
    def get(token: str) -> Any:
        return {"authorization": token}.get

    same = partition(get(first), (), SECRET) == partition(get(second), (), SECRET)
    assert same == (first == second)
    assert partition({}.get, (), SECRET) == ""
    assert partition({"x-api-key": "k"}.get, (), SECRET) != ""
    assert partition({"x-tenant": "t"}.get, ("X-Tenant",), SECRET) != ""
    assert partition({"x-tenant": "t"}.get, (), SECRET) == ""


def test_the_key_depends_on_the_secret_and_the_id_is_short() -> None:
    key = key_of({"input": "hi"})
    parts = KeyParts("POST", "http", "h", 1, "/", "", b"", (), "", "", None)
    assert cache_key(parts, SECRET) != cache_key(parts, b"t" * 32)
    assert len(key_id(key)) == 16 and key_id(key) in key and "hi" not in key


def test_key_headers_cover_content_type_accept_and_configured_ones() -> None:
    headers = {
        "content-type": "Application/JSON; charset=utf-8",
        "accept": "application/json",
        "x-lang": "de",
    }
    assert key_headers(headers.get, ("X-Lang",)) == (
        ("host", ""),
        ("content-type", "application/json;charset=utf-8"),
        ("accept", "application/json"),
        ("x-lang", "de"),
    )


def test_two_content_codings_are_never_undone() -> None:
    """`gzip, gzip` is a decompression bomb's shape: at most one coding is undone (issue 12)."""
    body = brotli.compress(gzip.compress(b'{"input": "hi"}'))
    with pytest.raises(BodyTooLarge, match="2 content codings"):
        canonical_body(body, "application/json", "gzip, br", ())


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some clients send it
        ("br", brotli.compress),
    ],
)
def test_compressed_bodies_are_decoded_before_keying(encoding: str, encode: Any) -> None:
    plain = b'{"input": "hi", "model": "m"}'
    assert decode_body(encode(plain), encoding) == plain
    expected = canonical_body(plain, "application/json", None, ()).data
    assert canonical_body(encode(plain), "application/json", encoding, ()).data == expected


def test_undecodable_and_non_json_bodies_are_keyed_by_their_bytes() -> None:
    assert canonical_body(b"not gzip", None, "gzip", ()).data == b"undecodable:gzip:not gzip"
    assert canonical_body(b"a,b\n1,2", "text/csv", None, ()).data == b"bytes:a,b\n1,2"
    assert canonical_body(b"{broken", "application/json", None, ()).data == b"bytes:{broken"
    assert canonical_body(b'{"a": 1}', None, None, ()).document == {"a": 1}


def test_ignored_fields_are_left_out_of_the_key() -> None:
    document = {"input": "hi", "request_id": "r1", "metadata": {"trace": "t1", "user": "u"}}
    ignored = ("request_id", "metadata.trace", "missing.path")
    assert drop_fields(document, ignored) == {"input": "hi", "metadata": {"user": "u"}}
    one = canonical_body(json.dumps(document).encode(), "application/json", None, ignored).data
    other = {**document, "request_id": "r2", "metadata": {"trace": "t2", "user": "u"}}
    assert canonical_body(json.dumps(other).encode(), "application/json", None, ignored).data == one


@given(st.lists(st.tuples(st.text(min_size=1), st.text()), max_size=5), st.randoms())
def test_the_order_of_different_names_does_not_matter(pairs: list[tuple[str, str]], random: Any) -> None:
    from urllib.parse import urlencode

    names = list(dict.fromkeys(name for name, _ in pairs))
    random.shuffle(names)
    shuffled = [pair for name in names for pair in pairs if pair[0] == name]
    assert canonical_query(urlencode(pairs)) == canonical_query(urlencode(shuffled))


def test_a_repeated_name_keeps_the_order_of_its_values() -> None:
    """`?x=2&x=1` is a list for most servers: not the request `?x=1&x=2`."""
    assert canonical_query("x=2&x=1") != canonical_query("x=1&x=2")
    assert canonical_query("b=1&x=2&a=0&x=1") == canonical_query("a=0&x=2&x=1&b=1")


@pytest.mark.parametrize(
    "name", ["api-key", "x-goog-api-key", "openai-organization", "openai-project", "cookie", "x-api-key"]
)
def test_every_common_credential_header_partitions_the_cache_by_default(name: str) -> None:
    """Azure's api-key, Google's key, OpenAI's organisation and project, cookies: a client without the
    credential, or with another one, never shares the entry a credential bought."""
    secret = b"s" * 32
    with_a = partition({name: "tenant-a"}.get, (), secret)
    with_b = partition({name: "tenant-b"}.get, (), secret)
    assert "" != with_a != with_b != ""
    assert partition({}.get, (), secret) == ""
