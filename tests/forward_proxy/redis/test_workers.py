"""`forward-proxy run --workers 2`: two real proxy processes behind one port, sharing the cache (the cache
directory or a real Redis), one admin listener with every worker's counts, and a clean stop."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.forward_proxy.redis.running import (
    alive,
    connection_owners,
    embed,
    fresh_session,
    report,
    start_workers,
    wait_until,
    worker_pids,
)
from tests.support.processes import console_script, free_port
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

CLIENTS = 16


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream(model_version="v1") as server:
        yield server


def check_shared_cache_across_workers(tmp_path: Path, upstream: Upstream, *args: str) -> None:
    admin_port = free_port()
    url = upstream.url("/v1/embeddings")
    text = f"workers {tmp_path.name}"
    before = upstream.calls("/v1/embeddings")
    with start_workers(tmp_path, 2, "--admin-port", str(admin_port), *args) as proxy:
        workers = worker_pids(proxy.process.pid)
        assert len(workers) == 2
        sessions = [fresh_session() for _ in range(CLIENTS)]  # one kept-alive connection each
        try:
            answers = [embed(session, proxy, url, text) for session in sessions]
            owners = connection_owners(proxy.port, workers)
        finally:
            for session in sessions:
                session.close()
        assert [answer.status_code for answer in answers] == [200] * CLIENTS
        assert [answer.headers["X-Cache"] for answer in answers] == ["MISS"] + ["HIT"] * (CLIENTS - 1)
        assert {answer.content for answer in answers} == {answers[0].content}
        assert upstream.calls("/v1/embeddings") == before + 1
        # The kernel spread the connections: both workers served (and so hits crossed workers).
        assert all(count > 0 for count in owners.values()), owners
        wait_until(lambda: report(admin_port)["requests"] == CLIENTS, 10, lambda: str(report(admin_port)))
        totals = report(admin_port)
        assert (totals["hits"], totals["misses"], totals["stores"]) == (CLIENTS - 1, 1, 1)


def test_two_workers_share_one_port_and_the_cache_directory(tmp_path: Path, upstream: Upstream) -> None:
    check_shared_cache_across_workers(tmp_path, upstream)


@pytest.mark.redis
def test_two_workers_share_one_port_and_redis(
    tmp_path: Path, upstream: Upstream, redis_server: RedisServer
) -> None:
    check_shared_cache_across_workers(tmp_path, upstream, "--cache-backend", redis_server.url)


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    proxy = start_workers(tmp_path, 2)
    workers = worker_pids(proxy.process.pid)
    assert len(workers) == 2 and all(alive(pid) for pid in workers)
    assert proxy.stop(signal.SIGTERM) == 0
    wait_until(lambda: not any(alive(pid) for pid in workers), 15, lambda: f"alive: {workers}")
    assert proxy.log().count("forward-proxy stopped") == 2


def test_a_killed_supervisor_leaves_no_worker_behind(tmp_path: Path) -> None:
    proxy = start_workers(tmp_path, 2)
    workers = worker_pids(proxy.process.pid)
    assert len(workers) == 2
    proxy.stop(signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in workers), 15, lambda: f"alive: {workers}")


def test_a_dead_worker_is_started_again(tmp_path: Path, upstream: Upstream) -> None:
    with start_workers(tmp_path, 2) as proxy:
        first, second = worker_pids(proxy.process.pid)
        subprocess.run(["kill", "-KILL", str(first)], check=True)
        wait_until(
            lambda: len(worker_pids(proxy.process.pid)) == 2 and first not in worker_pids(proxy.process.pid),
            30,
            proxy.log,
        )
        assert re.search(r"worker [01] exited with -9; starting it again", proxy.log())
        with fresh_session() as session:
            answer = embed(session, proxy, upstream.url("/v1/embeddings"), "after a restart")
        assert answer.status_code == 200 and second in worker_pids(proxy.process.pid)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "give 1 to 256 workers, not 0"),
        (["--workers", "two"], "'two' is not a number of workers"),
        (["--workers", "2", "--listen-port", "0"], "--workers needs a fixed --listen-port"),
        (["--workers", "2", "--cache-ttl", "0"], "cache_ttl: must be more than 0"),
        (["--workers", "2", "--cache-backend", "memcached://x:1"], "is not a backend"),
    ],
)
def test_a_bad_option_fails_at_once_with_a_message(args: list[str], message: str) -> None:
    result = subprocess.run(
        [console_script("forward-proxy"), "run", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "workers started" not in result.stdout
