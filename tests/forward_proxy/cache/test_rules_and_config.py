"""Cache rules, human units and the validated option set (pure)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forward_proxy.cache.config import OPTIONS, CacheConfig
from forward_proxy.cache.rules import DEFAULT_RULES, Rule, Rules, model_from_path
from forward_proxy.cache.units import format_duration, format_size, parse_duration, parse_size

DEFAULTS = Rules.parse(DEFAULT_RULES)


@pytest.mark.parametrize(
    ("method", "host", "port", "path", "label"),
    [
        ("POST", "127.0.0.1", 8000, "/v1/embeddings", "POST /v1/embeddings"),
        ("POST", "models.internal", 80, "/v1/embeddings", "POST /v1/embeddings"),
        ("POST", "127.0.0.1", 8000, "/v2/models/minilm/infer", "POST /v2/models/*/infer"),
        ("POST", "127.0.0.1", 8000, "/v2/models/m/versions/3/infer", "POST /v2/models/*/versions/*/infer"),
        ("GET", "127.0.0.1", 8000, "/v1/embeddings", None),
        ("POST", "127.0.0.1", 8000, "/v1/embeddings/extra", None),
        ("POST", "127.0.0.1", 8000, "/v2/models/a/b/infer", None),
        ("POST", "127.0.0.1", 8000, "/v1/chat/completions", "POST /v1/chat/completions"),
        ("POST", "127.0.0.1", 8000, "/v1/completions", "POST /v1/completions"),
        ("POST", "127.0.0.1", 8000, "/v1/models", None),
        ("GET", "example.com", 443, "/", None),
    ],
)
def test_default_rules(method: str, host: str, port: int, path: str, label: str | None) -> None:
    rule = DEFAULTS.match(method, "http", host, port, path)
    assert (rule.label if rule else None) == label


def test_url_rules_match_one_origin_and_double_star_spans_segments() -> None:
    rule = Rule.parse("post http://127.0.0.1:8000/v1/**")
    assert rule.label == "POST http://127.0.0.1:8000/v1/**"
    assert rule.matches("POST", "http", "127.0.0.1", 8000, "/v1/a/b/c")
    assert not rule.matches("POST", "http", "127.0.0.1", 8001, "/v1/a")
    assert not rule.matches("POST", "https", "127.0.0.1", 8000, "/v1/a")
    assert Rule.parse("* https://*.example.com/x").matches("GET", "https", "API.example.com", 443, "/x")


@pytest.mark.parametrize(
    "text", ["POST", "/v1/embeddings", "POST v1/embeddings", "POST ftp://h/x", "PO-ST /x"]
)
def test_bad_rules_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="cache rule"):
        Rule.parse(text)


def test_model_from_path() -> None:
    assert model_from_path("/v2/models/minilm/infer") == "minilm"
    assert model_from_path("/v1/embeddings") is None


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GiB", 2**30), ("512MiB", 512 * 2**20), ("200MB", 200_000_000), ("10", 10), ("1.5 KiB", 1536)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h", 3600), ("90s", 90), ("5m", 300), ("1d", 86400), ("1h30m", 5400), ("500ms", 0.5), ("2.5", 2.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "1x", "-5", "1h soon", ""])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=10**7))
def test_format_duration_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_size() -> None:
    assert format_size(2**30) == "1.0 GiB"
    assert format_size(512) == "512 B"


def options(**changes: Any) -> SimpleNamespace:
    return SimpleNamespace(**{**{option.name: option.default for option in OPTIONS}, **changes})


def test_defaults_validate() -> None:
    config = CacheConfig.from_options(options(cache_dir="/tmp/c"))
    assert config.ttl == 3600 and config.size_limit == 2**30 and config.statuses == {200}
    assert config.version_check_interval == 5 and config.stale_if_error == 600
    assert config.describe() == "/tmp/c, 1.0 GiB, ttl 1h"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cache_ttl": "0"}, "cache_ttl: must be more than 0"),
        ({"cache_size": "lots"}, "cache_size: 'lots' is not a size"),
        ({"cache_rules": ["GET"]}, "cache_rules: cache rule 'GET'"),
        ({"cache_statuses": ["ok"]}, "cache_statuses: 'ok' is not an HTTP status code"),
        ({"version_check_path": "health"}, "version_check_path"),
        ({"upstream_timeout": "0s"}, "upstream_timeout"),
        ({"stale_if_error": "later"}, "stale_if_error: 'later' is not a duration"),
    ],
)
def test_bad_option_values_name_the_option(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CacheConfig.from_options(options(**changes))


def test_every_option_has_a_help_text() -> None:
    for option in OPTIONS:
        assert len(option.help) > 20, option.name
