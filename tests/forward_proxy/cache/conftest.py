"""One cache-semantics suite, two backends: the tests of `test_addon.py` and `test_proxy_integration.py`
run once against diskcache (a temporary cache directory) and once against a real `redis-server` on an
ephemeral loopback port (`--cache-backend redis://...`).

A module takes part with `pytestmark = pytest.mark.usefixtures("cache_backend")`; its tests then get the
`cache_backend` parameter `disk` or `redis`, and build their caches from `cache_backend.options(tmp_path)`
(addon options) or `cache_backend.args(tmp_path)` (`forward-proxy run` arguments). Each cache is empty:
with Redis, its keys carry a prefix named after the test's own temporary directory. A test about the disk
itself (an unusable, read-only or full cache directory) says so with `@pytest.mark.disk_only` and runs
with diskcache alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer, redis_available

BACKENDS = ("disk", "redis")


@dataclass(frozen=True)
class CacheBackend:
    name: str  # "disk" or "redis"
    redis: RedisServer | None = None

    def url(self, tmp_path: Path) -> str:
        """The Redis URL of a cache of its own for the test of `tmp_path`; "" for diskcache."""
        if self.redis is None:
            return ""
        return f"{self.redis.url}?prefix={tmp_path.name}:"

    def options(self, tmp_path: Path) -> dict[str, str]:
        """Cache addon options (for `taddons.context().configure`)."""
        url = self.url(tmp_path)
        return {"cache_backend": url} if url else {}

    def args(self, tmp_path: Path) -> tuple[str, ...]:
        """`forward-proxy run` arguments."""
        url = self.url(tmp_path)
        return ("--cache-backend", url) if url else ()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "disk_only: a cache test about the cache directory itself")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cache_backend" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("disk_only") is not None:
        names = [pytest.param("disk", id="disk")]
    else:
        names = [pytest.param("disk", id="disk"), pytest.param("redis", id="redis", marks=pytest.mark.redis)]
    metafunc.parametrize("cache_backend", names, indirect=True, scope="module")


@pytest.fixture(scope="session")
def cache_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for every Redis run of the suite (each test has a key prefix of its own)."""
    with RedisServer(tmp_path_factory.mktemp("cache-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def cache_backend(request: pytest.FixtureRequest) -> CacheBackend:
    name = getattr(request, "param", "disk")
    if name == "disk":
        return CacheBackend("disk")
    if not redis_available():
        pytest.skip("redis-server is not installed (scripts/install-system.sh installs it)")
    return CacheBackend("redis", request.getfixturevalue("cache_redis"))
