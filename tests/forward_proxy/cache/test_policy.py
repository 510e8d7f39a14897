"""Request directives, storability, lifetimes and which entries may be served (pure, table-driven)."""

from __future__ import annotations

import dataclasses

import pytest

from forward_proxy.cache.policy import (
    RequestDirectives,
    Usability,
    age_header,
    opaque_server_error,
    parse_cache_control,
    request_directives,
    response_lifetime,
    unstorable_reason,
    usability,
)
from tests.forward_proxy.store.test_disk import make_entry


@pytest.mark.parametrize(
    ("cache_control", "pragma", "expected"),
    [
        (None, None, RequestDirectives()),
        ("no-cache", None, RequestDirectives(no_cache=True)),
        (None, "no-cache", RequestDirectives(no_cache=True)),
        ("max-age=5", "no-cache", RequestDirectives(max_age=5.0)),  # Cache-Control wins over Pragma
        ("No-Store", None, RequestDirectives(no_store=True)),
        ("max-age=30", None, RequestDirectives(max_age=30.0)),
        ('max-age="30"', None, RequestDirectives(max_age=30.0)),
        ("max-age=soon", None, RequestDirectives(max_age=0.0)),
        ("only-if-cached, max-age=0", None, RequestDirectives(max_age=0.0, only_if_cached=True)),
    ],
)
def test_request_directives(
    cache_control: str | None, pragma: str | None, expected: RequestDirectives
) -> None:
    assert request_directives(cache_control, pragma) == expected


def test_parse_cache_control() -> None:
    assert parse_cache_control(' public, max-age=60 ,, s-maxage="5"') == {
        "public": None,
        "max-age": "60",
        "s-maxage": "5",
    }


@pytest.mark.parametrize(
    ("status", "headers", "size", "reason"),
    [
        (200, {}, 10, None),
        (201, {}, 10, "status 201"),
        (500, {}, 10, "status 500"),
        (200, {"cache-control": "no-store"}, 10, "Cache-Control: no-store"),
        (200, {"cache-control": "private, max-age=60"}, 10, "Cache-Control: private"),
        (200, {"cache-control": "no-cache"}, 10, "Cache-Control: no-cache"),
        (200, {"cache-control": "max-age=0"}, 10, "Cache-Control: max-age=0"),
        (200, {"set-cookie": "session=1"}, 10, "sets a cookie"),
        (200, {"vary": "*"}, 10, "Vary: *"),
        (
            200,
            {"content-type": "text/event-stream; charset=utf-8"},
            10,
            "streamed (text/event-stream), not recorded whole",
        ),
        (200, {}, 101, "101 bytes, over the entry size limit of 100"),
        (200, {"cache-control": "public, max-age=60"}, 100, None),
    ],
)
def test_unstorable_reason(status: int, headers: dict[str, str], size: int, reason: str | None) -> None:
    assert unstorable_reason(status, headers, size, {200}, max_entry_size=100) == reason


def test_response_lifetime_is_the_ttl_shortened_by_the_response() -> None:
    assert response_lifetime(None, 3600) == 3600
    assert response_lifetime("max-age=60", 3600) == 60
    assert response_lifetime("max-age=60, s-maxage=10", 3600) == 10
    assert response_lifetime("max-age=99999", 3600) == 3600


@pytest.mark.parametrize(
    ("age", "max_age", "version", "expected"),
    [
        (0, None, "v1", Usability.FRESH),
        (60, None, "v1", Usability.FRESH),
        (61, None, "v1", Usability.STALE),
        (160, None, "v1", Usability.STALE),
        (161, None, "v1", Usability.UNUSABLE),
        (20, 30, "v1", Usability.FRESH),
        (40, 30, "v1", Usability.STALE),  # too old for this request, still a stand-in on failure
        (0, None, "v2", Usability.UNUSABLE),  # another deployment computed it: never served
        (0, None, None, Usability.UNUSABLE),
    ],
)
def test_usability(age: float, max_age: float | None, version: str | None, expected: Usability) -> None:
    entry = dataclasses.replace(make_entry(), stored_at=1000.0, model_version="v1")
    found = usability(
        entry, now=1000.0 + age, lifetime=60, max_age=max_age, stale_if_error=100, current_version=version
    )
    assert found is expected


def test_entries_without_a_version_are_kept_by_ttl_alone() -> None:
    entry = dataclasses.replace(make_entry(), stored_at=0.0, model_version=None)
    assert usability(entry, now=1, lifetime=60, max_age=None, stale_if_error=0, current_version=None) is (
        Usability.FRESH
    )


def test_age_header_counts_whole_seconds() -> None:
    entry = dataclasses.replace(make_entry(), stored_at=100.0)
    assert age_header(entry, 100.2) == "0"
    assert age_header(entry, 102.9) == "2"
    assert age_header(entry, 50.0) == "0"


@pytest.mark.parametrize(
    ("status", "content_type", "content", "opaque"),
    [
        (503, "text/html", b"<h1>503 Service Unavailable</h1>", True),
        (502, "", b"", True),
        (500, "application/json", b"", True),
        (500, "application/json", b'{"error": {"code": "cut', True),
        (500, "application/json", b'{"error": {"code": "internal"}}', False),
        (503, "application/problem+json; charset=utf-8", b'{"title": "overloaded"}', False),
        (404, "text/html", b"<h1>404</h1>", False),
        (200, "text/html", b"<h1>ok</h1>", False),
    ],
)
def test_opaque_server_errors_are_5xx_answers_without_a_json_body(
    status: int, content_type: str, content: bytes, opaque: bool
) -> None:
    header = {"content-type": content_type} if content_type else {}
    assert opaque_server_error(status, header, content) is opaque


def test_policy_docstring_examples() -> None:
    import doctest

    from forward_proxy.cache import policy

    result = doctest.testmod(policy)
    assert result.attempted > 0 and result.failed == 0
