"""Proxy faults through a real `forward-proxy run`: killed with SIGKILL in a burst of cache writes, its
cache directory made read-only, filled or corrupted while it runs, stopped with SIGTERM under load.

Whatever happens, every answer a client gets is the upstream's answer to that very request (the upstream
here answers each request with bytes that depend on the request only, so the test can tell), requests
keep succeeding (uncached when the store fails), and the cache works again once the fault is gone."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.reliability.faults import SLOW_SECONDS, Fault, FaultyUpstream, healthy_json
from tests.support.privileges import without_root_privileges
from tests.support.proxy import RunningProxy, start_proxy

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

STORE_FAILED = "cache store failed, forwarding uncached"
LARGE = 40_000  # characters: the stored answer exceeds diskcache's 32 KiB, so it goes to a file of its own


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    with FaultyUpstream() as server:
        yield server


def request_for(index: int) -> tuple[str, dict[str, Any]]:
    """The index-th distinct request: whole KServe answers, small and large, and embeddings cached row
    by row."""
    if index % 3 == 0:
        return "/v2/models/burst/infer", {"inputs": [], "id": index, "pad": "x" * LARGE}
    if index % 3 == 1:
        return "/v2/models/burst/infer", {"inputs": [], "id": index}
    return "/v1/embeddings", {"input": [f"request {index} a", f"request {index} b c"], "model": "m"}


def ask(proxy: RunningProxy, upstream: FaultyUpstream, index: int) -> requests.Response:
    path, body = request_for(index)
    with proxy.session() as session:
        return session.post(upstream.url(path), json=body, timeout=(5, 30))


def assert_right(answer: requests.Response, index: int) -> None:
    """The answer is the upstream's own answer to request `index`: nothing wrong was served."""
    path, body = request_for(index)
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json() == healthy_json(path, body), f"request {index} got another answer"


def ask_all(
    proxy: RunningProxy, upstream: FaultyUpstream, indices: Sequence[int], workers: int = 4
) -> list[str]:
    """Ask each request, check its answer, return the X-Cache decisions in order."""

    def one(index: int) -> str:
        answer = ask(proxy, upstream, index)
        assert_right(answer, index)
        return answer.headers["X-Cache"]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, indices))


def test_kill_9_in_a_burst_of_cache_writes_leaves_no_corrupt_entry(
    tmp_path: Path, upstream: FaultyUpstream
) -> None:
    burst = range(1000, 1120)
    cache_dir = tmp_path / "cache"
    proxy = start_proxy(tmp_path, cache_dir=cache_dir)
    answered: list[tuple[int, requests.Response]] = []
    try:

        def one(index: int) -> None:
            with contextlib.suppress(requests.RequestException):  # in flight or queued when it died
                answered.append((index, ask(proxy, upstream, index)))

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(one, index) for index in burst]
            deadline = time.monotonic() + 60
            while len(answered) < 40 and time.monotonic() < deadline:
                time.sleep(0.005)
            proxy.process.kill()  # SIGKILL: no chance to close the database
            for future in futures:
                future.result()
    finally:
        proxy.stop()
    assert 40 <= len(answered) < len(burst), "the kill did not land within the burst"
    for index, answer in answered:
        assert_right(answer, index)

    with start_proxy(tmp_path, cache_dir=cache_dir) as restarted:
        decisions = ask_all(restarted, upstream, burst)
        assert decisions.count("HIT") >= 20, "the entries written before the kill were lost"
        assert set(ask_all(restarted, upstream, burst)) == {"HIT"}  # and the cache works on


def _refuses_connections(proxy: RunningProxy, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((proxy.host, proxy.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


def test_sigterm_under_load_answers_the_requests_in_flight_and_refuses_new_ones(
    tmp_path: Path, upstream: FaultyUpstream
) -> None:
    """Regression: SIGTERM cut every request in flight. Now 16 requests waiting for a slow upstream when
    it arrives all get their right answers, new connections are refused meanwhile, and the proxy exits 0."""
    path = "/v2/models/slow/infer"
    upstream.behave(path, Fault.SLOW)
    bodies = [{"inputs": [], "id": f"in flight {index}"} for index in range(16)]
    cache_dir = tmp_path / "cache"
    proxy = start_proxy(tmp_path, cache_dir=cache_dir)
    try:

        def one(body: dict[str, Any]) -> requests.Response:
            with proxy.session() as session:
                return session.post(upstream.url(path), json=body, timeout=(5, 30))

        calls = upstream.calls(path)
        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(one, body) for body in bodies]
            upstream.wait_for_calls(path, calls + len(bodies))
            assert proxy.process.proc is not None
            proxy.process.proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            assert _refuses_connections(proxy), "still accepting connections after SIGTERM"
            status = proxy.process.proc.wait(timeout=30)
            results = [future.result() for future in futures]
        assert status == 0 and time.monotonic() - stopped_at < SLOW_SECONDS + 10
        assert "forward-proxy stopped" in proxy.log()
    finally:
        proxy.stop()
        upstream.behave(path, None)
    for body, answer in zip(bodies, results, strict=True):
        assert answer.status_code == 200 and answer.json() == healthy_json(path, body)

    with start_proxy(tmp_path, cache_dir=cache_dir) as restarted, restarted.session() as session:
        for body in bodies:
            answer = session.post(upstream.url(path), json=body, timeout=30)
            assert answer.status_code == 200 and answer.json() == healthy_json(path, body)


def test_a_second_sigterm_stops_at_once_and_cuts_cleanly(tmp_path: Path, upstream: FaultyUpstream) -> None:
    """A request that cannot finish (the upstream hangs) holds the first SIGTERM's drain; the second stops
    the proxy at once, and the client sees the connection closed, not a partial or wrong answer."""
    path = "/v2/models/hung-at-stop/infer"
    upstream.behave(path, Fault.HANG)
    proxy = start_proxy(tmp_path, "--set", "upstream_timeout=60s")
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, proxy.session() as session:
            calls = upstream.calls(path)
            hung = pool.submit(session.post, upstream.url(path), json={"inputs": []}, timeout=(5, 30))
            upstream.wait_for_calls(path, calls + 1)
            assert proxy.process.proc is not None
            proxy.process.proc.send_signal(signal.SIGTERM)
            assert _refuses_connections(proxy)
            assert proxy.process.proc.poll() is None  # draining: the hung request is still in flight
            proxy.process.proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            assert proxy.process.proc.wait(timeout=15) == 0 and time.monotonic() - stopped_at < 5
            with pytest.raises(requests.ConnectionError):
                hung.result()
    finally:
        proxy.stop()
        upstream.behave(path, None)


def _chmod_tree(directory: Path, directories: int, files: int) -> None:
    for root, _, names in os.walk(directory):
        os.chmod(root, directories)
        for name in names:
            os.chmod(os.path.join(root, name), files)


def test_a_cache_directory_made_read_only_while_running(tmp_path: Path, upstream: FaultyUpstream) -> None:
    cache_dir = tmp_path / "cache"
    with start_proxy(tmp_path, cache_dir=cache_dir, wrapper=without_root_privileges()) as proxy:
        warm = range(2000, 2006)
        assert ask_all(proxy, upstream, warm).count("MISS") == len(warm)
        _chmod_tree(cache_dir, 0o555, 0o444)
        try:
            assert set(ask_all(proxy, upstream, warm)) == {"HIT"}  # reading still works
            cold = range(2100, 2112)
            ask_all(proxy, upstream, cold)
            ask_all(proxy, upstream, cold)  # served right, whether the store could keep it or not
            assert STORE_FAILED in proxy.log()  # large answers need new files, which cannot be made
        finally:
            _chmod_tree(cache_dir, 0o755, 0o644)
        again = range(2200, 2206)
        ask_all(proxy, upstream, again)
        # Writable again: cached again. A store is written just after its answer leaves, so on a loaded
        # machine a repeat can overtake it: ask again for a few seconds before calling it a failure.
        deadline = time.monotonic() + 15
        while (decisions := set(ask_all(proxy, upstream, again))) != {"HIT"}:
            assert time.monotonic() < deadline, f"not cached again once writable: {decisions}"
            time.sleep(0.5)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (root only: an honest full disk, ENOSPC, without filling the machine's)."""
    if os.geteuid() != 0:
        pytest.skip("filling a disk needs a small tmpfs of its own, which only root can mount")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb") as file:
        while True:
            try:
                file.write(chunk)
                file.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


def test_a_cache_disk_filled_while_running(
    small_disk: Path, tmp_path: Path, upstream: FaultyUpstream
) -> None:
    with start_proxy(tmp_path, cache_dir=small_disk / "cache") as proxy:
        warm = range(3000, 3006)
        ask_all(proxy, upstream, warm)
        filler = _fill(small_disk)
        try:
            assert set(ask_all(proxy, upstream, warm)) == {"HIT"}
            cold = range(3100, 3112)
            ask_all(proxy, upstream, cold)
            ask_all(proxy, upstream, cold)
            assert STORE_FAILED in proxy.log()
        finally:
            filler.unlink()
        again = range(3200, 3206)
        ask_all(proxy, upstream, again)
        assert set(ask_all(proxy, upstream, again)) == {"HIT"}  # room again: cached again
        assert proxy.process.proc is not None and proxy.process.proc.poll() is None


def _overwrite_with_noise(cache_dir: Path, seed: int = 7) -> None:
    """What a failing disk leaves: random bytes over every page of both SQLite databases and their
    write-ahead logs (the shared-memory index, -shm, is mapped memory rather than disk, and left alone)."""
    generator = random.Random(seed)
    for database in sorted(cache_dir.rglob("cache.db*")):
        if database.name.endswith("-shm"):
            continue
        size = database.stat().st_size
        with database.open("r+b") as file:
            for offset in range(0, size, 4096):
                file.seek(offset)
                file.write(generator.randbytes(min(4096, size - offset)))


def test_a_cache_database_corrupted_while_running(tmp_path: Path, upstream: FaultyUpstream) -> None:
    cache_dir = tmp_path / "cache"
    warm, cold = range(4000, 4012), range(4100, 4112)
    with start_proxy(tmp_path, cache_dir=cache_dir) as proxy:
        ask_all(proxy, upstream, warm)
        _overwrite_with_noise(cache_dir)
        ask_all(proxy, upstream, warm)  # right answers, whether from the store or not
        ask_all(proxy, upstream, cold)
        assert STORE_FAILED in proxy.log()
        assert proxy.process.proc is not None and proxy.process.proc.poll() is None
    with start_proxy(tmp_path, cache_dir=cache_dir) as restarted:  # starts on the broken directory
        ask_all(restarted, upstream, [*warm, *cold])


MARKER, FORGERY = b"entry-marker-4200", b"entry-forged-4200"


def _alter_stored_bytes(cache_dir: Path) -> int:
    """Change the marker wherever it is stored (database, write-ahead log, value files), keeping the
    length and the JSON valid: damage that no page structure reveals. How many files held it."""
    altered = 0
    for path in sorted(cache_dir.rglob("*")):
        if path.is_file() and not path.name.endswith("-shm"):
            data = path.read_bytes()
            if MARKER in data:
                path.write_bytes(data.replace(MARKER, FORGERY))
                altered += 1
    return altered


def test_damaged_bytes_inside_a_stored_answer_are_never_served(
    tmp_path: Path, upstream: FaultyUpstream
) -> None:
    """Regression: SQLite does not notice bytes changed inside a row, and the proxy served the altered
    answer as a HIT. Entries now carry a checksum; a damaged one is a store failure, and is replaced."""
    path = "/v2/models/marked/infer"
    small, large = (
        {"inputs": [], "id": MARKER.decode()},
        {"inputs": [], "id": MARKER.decode(), "pad": "y" * LARGE},
    )
    cache_dir = tmp_path / "cache"

    def check(proxy: RunningProxy, body: dict[str, Any]) -> str:
        with proxy.session() as session:
            answer = session.post(upstream.url(path), json=body, timeout=30)
        assert answer.status_code == 200 and answer.json() == healthy_json(path, body)
        return answer.headers["X-Cache"]

    with start_proxy(tmp_path, cache_dir=cache_dir) as proxy:
        assert [check(proxy, small), check(proxy, large)] == ["MISS", "MISS"]
        assert [check(proxy, small), check(proxy, large)] == ["HIT", "HIT"]
    # Stopped, so that the answers are in the files (not only in the write-ahead log or a page cache) and
    # the restarted proxy reads them from there: the database file and the large answer's value file.
    assert _alter_stored_bytes(cache_dir) == 2
    with start_proxy(tmp_path, cache_dir=cache_dir) as restarted:
        assert [check(restarted, small), check(restarted, large)] == ["MISS", "MISS"]
        assert "is damaged (its checksum differs)" in restarted.log()
        assert [check(restarted, small), check(restarted, large)] == ["HIT", "HIT"]  # replaced
