"""Fixtures for the Redis backend tests: a real `redis-server` on an ephemeral loopback port per test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forward_proxy.store.base import Entry
from tests.support.redis_server import RedisServer, redis_available


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not redis_available():
        pytest.skip("redis-server is not installed (scripts/install-system.sh installs it)")
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def make_entry(
    content: bytes = b'{"data": [1]}', key_id: str = "k1", model_version: str | None = "v1"
) -> Entry:
    headers = (("content-type", "application/json"), ("x-model-version", model_version or ""))
    return Entry(
        status_code=200,
        headers=headers,
        content=content,
        stored_at=time.time(),
        upstream_seconds=0.25,
        model_version=model_version,
        origin="http://127.0.0.1:8000",
        route="POST /v1/embeddings",
        model="minilm",
        method="POST",
        path="/v1/embeddings?x=1",
        key_id=key_id,
        size=len(content) + 60,
    )
