"""Redis URLs: every supported form parses to the right target, every mistake is a sentence (no server)."""

from __future__ import annotations

import doctest

import pytest

from forward_proxy.store import backend, locks, redis, tier
from forward_proxy.store.redis import connection as redis_connection
from forward_proxy.store.redis import entries as redis_entries
from forward_proxy.store.redis import is_redis_url, parse_redis_url
from forward_proxy.store.redis import url as redis_url


@pytest.mark.parametrize(
    ("url", "kind", "prefix", "display"),
    [
        ("redis://127.0.0.1:6379/0", "server", "fp:", "redis://127.0.0.1:6379/0"),
        ("redis://localhost", "server", "fp:", "redis://localhost"),
        ("redis://user:s3cret@cache:6380/2", "server", "fp:", "redis://user:***@cache:6380/2"),
        (
            "redis://:s3cret@cache:6380/2?prefix=team-a:",
            "server",
            "team-a:",
            "redis://:***@cache:6380/2?prefix=team-a:",
        ),
        (
            "rediss://cache:6380/0?ssl_cert_reqs=none",
            "server",
            "fp:",
            "rediss://cache:6380/0?ssl_cert_reqs=none",
        ),
        ("unix:///run/redis/redis.sock?db=1", "server", "fp:", "unix:///run/redis/redis.sock?db=1"),
        ("redis+cluster://node1:7000", "cluster", "fp:", "redis+cluster://node1:7000"),
        (
            "rediss+cluster://u:p@node1:7000?prefix=x:",
            "cluster",
            "x:",
            "rediss+cluster://u:***@node1:7000?prefix=x:",
        ),
        (
            "redis+sentinel://s1:26379,s2:26379/mymaster/3",
            "sentinel",
            "fp:",
            "redis+sentinel://s1:26379,s2:26379/mymaster/3",
        ),
    ],
)
def test_supported_urls(url: str, kind: str, prefix: str, display: str) -> None:
    target = parse_redis_url(url)
    assert is_redis_url(url)
    assert (target.kind, target.prefix, target.display) == (kind, prefix, display)
    assert "prefix" not in target.url and "s3cret" not in target.display


def test_own_parameters_do_not_reach_redis_py() -> None:
    target = parse_redis_url("redis://h:1/0?prefix=a:&retry_interval=2.5&socket_timeout=0.1")
    assert target.retry_interval == 2.5
    assert target.url == "redis://h:1/0?socket_timeout=0.1"


def test_sentinel_url_parts() -> None:
    target = parse_redis_url(
        "rediss+sentinel://app:pw@10.0.0.1:26379,[::1]:26380/cache/2?sentinel_password=spw&socket_timeout=0.2"
    )
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (target.service, target.db) == ("cache", 2)
    assert target.options == {
        "sentinel_password": "spw",
        "socket_timeout": 0.2,
        "username": "app",
        "password": "pw",
        "ssl": True,
    }
    assert "spw" not in target.display and "pw@" not in target.display


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/var/cache/fp", "is not a Redis URL"),
        ("http://cache:6379", "is not a Redis URL"),
        ("redis://cache:notaport/0", "Port could not be cast"),
        ("redis://cache:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis:///0", "names no host"),
        ("redis://cache:6379/0?retry_interval=-1", "retry_interval must be 0 or more"),
        ("redis+sentinel://s1:26379", "write redis\\+sentinel://host:26379"),
        ("redis+sentinel://s1/mymaster", "needs host:port"),
        ("redis+sentinel://s1:26379/mymaster/zero", "is not a number"),
        ("redis+sentinel://s1:26379/mymaster?colour=blue", "unknown parameter 'colour'"),
    ],
)
def test_mistakes_are_explained(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_a_password_never_shows_in_an_error() -> None:
    with pytest.raises(ValueError) as raised:
        parse_redis_url("http://user:hunter2@cache:6379")
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize("module", [redis, redis_url, redis_connection, redis_entries, locks, tier, backend])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0
