"""Selecting and describing cache entries (pure)."""

from __future__ import annotations

import base64

import pytest

from forward_proxy.stats.entries import (
    AmbiguousKey,
    Selection,
    details,
    entry_json,
    find,
    listing,
    route_matches,
    select,
)
from forward_proxy.store.base import Entry

NOW = 1_700_000_000.0


def entry(key_id: str, *, age: float = 60.0, origin: str = "http://127.0.0.1:8000", route: str = "POST /v1/embeddings",
          content: bytes = b'{"data": [1, 2]}', model: str | None = "mini") -> Entry:  # fmt: skip
    method, _, path = route.partition(" ")
    return Entry(
        status_code=200,
        headers=(("content-type", "application/json"), ("x-model-version", "v1")),
        content=content,
        stored_at=NOW - age,
        upstream_seconds=0.25,
        model_version="v1",
        origin=origin,
        route=route,
        model=model,
        method=method,
        path=path.replace("*", "digits"),
        key_id=key_id,
        size=len(content) + 50,
    )


STORED = [
    ("k-a", entry("aaaa1111", age=10)),
    ("k-b", entry("aaaa2222", age=7200, route="POST /v2/models/*/infer", model="digits")),
    ("k-c", entry("bbbb3333", age=30, origin="http://127.0.0.1:9000/")),
]


@pytest.mark.parametrize(
    ("pattern", "route", "expected"),
    [
        ("POST /v1/embeddings", "POST /v1/embeddings", True),
        ("POST /v1/*", "POST /v1/embeddings", True),
        ("/v1/*", "POST /v1/embeddings", True),
        ("GET /v1/*", "POST /v1/embeddings", False),
        ("/v2/*", "POST /v1/embeddings", False),
        ("/v2/models/*/infer", "POST /v2/models/*/infer", True),
        ("embeddings", "POST /v1/embeddings", False),
    ],
)
def test_route_patterns(pattern: str, route: str, expected: bool) -> None:
    assert route_matches(pattern, route) is expected


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (Selection(), ["k-b", "k-c", "k-a"]),
        (Selection(origin="http://127.0.0.1:9000"), ["k-c"]),
        (Selection(origin="http://127.0.0.1:8000/"), ["k-b", "k-a"]),
        (Selection(route="/v2/*"), ["k-b"]),
        (Selection(older_than=20), ["k-b", "k-c"]),
        (Selection(older_than=3600, route="POST /v1/*"), []),
        (Selection(keys=("aaaa1111", "bbbb3333")), ["k-c", "k-a"]),
        (Selection(keys=("aaaa",)), []),  # purge names whole key ids, never prefixes
    ],
)
def test_selection_keeps_what_every_condition_names_oldest_first(
    selection: Selection, expected: list[str]
) -> None:
    assert [key for key, _ in select(STORED, selection, NOW)] == expected


def test_selection_describes_itself() -> None:
    assert Selection().describe() == "every entry"
    assert Selection().is_everything
    both = Selection(origin="http://m:1", older_than=5400)
    assert both.describe() == "origin http://m:1 and older than 1h30m"
    assert not both.is_everything


def test_find_takes_a_whole_key_id_or_a_unique_start() -> None:
    assert find(STORED, "bbbb3333") == STORED[2]
    assert find(STORED, "bb") == STORED[2]
    assert find(STORED, "cc") is None
    with pytest.raises(AmbiguousKey, match="aaaa1111, aaaa2222"):
        find(STORED, "aaaa")


def test_listing_is_newest_first_with_a_total() -> None:
    lines = listing(STORED, NOW).splitlines()
    assert lines[0].split() == ["KEY", "AGE", "SIZE", "STATUS", "ORIGIN", "ROUTE", "MODEL", "PATH"]
    assert [line.split()[0] for line in lines[1:4]] == ["aaaa1111", "bbbb3333", "aaaa2222"]
    assert lines[1].split()[:4] == ["aaaa1111", "10s", "66", "B"]
    assert lines[-1] == "3 entries, 198 B"
    assert listing([], NOW) == "The cache holds no entries.\n"


def test_json_of_an_entry() -> None:
    described = entry_json(STORED[0][1], NOW, with_content=True)
    assert described["key"] == "aaaa1111" and described["age_seconds"] == 10.0
    assert described["headers"][0] == ["content-type", "application/json"]
    assert (described["body"], described["body_encoding"]) == ('{"data": [1, 2]}', "utf-8")
    binary = entry_json(entry("cccc", content=b"\xff\x00"), NOW, with_content=True)
    assert base64.b64decode(binary["body"]) == b"\xff\x00" and binary["body_encoding"] == "base64"
    assert "body" not in entry_json(STORED[0][1], NOW)


def test_details_show_metadata_headers_and_a_readable_body() -> None:
    text = details(STORED[1][1], NOW)
    assert "key            aaaa2222" in text
    assert "request        POST /v2/models/digits/infer" in text
    assert "stored         2023-11-14 20:13:20 UTC (2h ago)" in text
    assert "  x-model-version: v1" in text
    assert '"data": [\n    1,' in text  # JSON bodies are pretty-printed
    assert "(binary;" in details(entry("cccc", content=b"\xff\x00"), NOW)
