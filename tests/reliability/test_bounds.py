"""Bounded work per request (issue 12): no single request can make the cache decode, parse or split
without limit. Each test runs a real `forward-proxy run` and measures what a bystander notices."""

from __future__ import annotations

import gzip
import json
import statistics
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Reply, Upstream

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream(model_version="v1") as server:
        yield server


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[RunningProxy]:
    with start_proxy(tmp_path) as running:
        yield running


def rss_bytes(proxy: RunningProxy) -> int:
    assert proxy.process.proc is not None
    status = Path(f"/proc/{proxy.process.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


def bystander_latencies(proxy: RunningProxy, url: str, stop: threading.Event, out: list[float]) -> None:
    """An unrelated client asking every 10 ms while the heavy request runs (bounded: at most 30 s)."""
    deadline = time.monotonic() + 30
    with proxy.session() as session:
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            session.get(url, timeout=30)
            out.append(time.monotonic() - started)
            time.sleep(0.01)


def gzip_bomb(decoded_size: int, layers: int) -> bytes:
    """Zeros gzipped `layers` times: a few KB that decode to `decoded_size` bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\0" * (1 << 20)
    parts = [compressor.compress(chunk) for _ in range(decoded_size // len(chunk))]
    data = b"".join(parts) + compressor.flush()
    for _ in range(layers - 1):
        data = gzip.compress(data, 9)
    return data


@pytest.mark.parametrize("layers", [1, 2])
def test_a_decompression_bomb_is_forwarded_untouched_and_costs_the_proxy_nothing(
    proxy: RunningProxy, upstream: Upstream, layers: int
) -> None:
    bomb = gzip_bomb(512 << 20, layers)  # 512 MiB of zeros in a few hundred KB (two layers: about 1 KB)
    path = f"/v1/embeddings/bomb{layers}"
    upstream.reply(path, Reply(body=b'{"error": "not json"}', status=400))
    before = rss_bytes(proxy)
    stop, latencies = threading.Event(), []  # type: ignore[var-annotated]
    watcher = threading.Thread(
        target=bystander_latencies, args=(proxy, upstream.url("/healthz"), stop, latencies)
    )
    watcher.start()
    try:
        time.sleep(0.2)
        with proxy.session() as session:
            answer = session.post(
                upstream.url("/v1/embeddings"),
                data=bomb,
                headers={
                    "Content-Type": "application/json",
                    "Content-Encoding": ", ".join(["gzip"] * layers),
                },
                timeout=60,
            )
        time.sleep(0.2)
    finally:
        stop.set()
        watcher.join()
    grown = rss_bytes(proxy) - before
    assert answer.headers["X-Cache"] == "BYPASS"
    assert upstream.received("/v1/embeddings")[-1].body == bomb  # the client's bytes, untouched
    assert grown < 100 << 20, f"the proxy grew by {grown >> 20} MiB"
    assert max(latencies) < 0.1, f"a bystander waited {max(latencies) * 1000:.0f} ms"


def test_a_batch_over_max_batch_rows_is_cached_whole_and_a_bystander_barely_notices(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    texts = [f"row {index}" for index in range(100_000)]  # about 1.1 MB of JSON
    url = upstream.url("/v1/embeddings")
    stop, latencies = threading.Event(), []  # type: ignore[var-annotated]
    watcher = threading.Thread(
        target=bystander_latencies, args=(proxy, upstream.url("/healthz"), stop, latencies)
    )
    watcher.start()
    try:
        with proxy.session() as session:
            answers = [session.post(url, json={"input": texts, "model": "m"}, timeout=60) for _ in range(2)]
    finally:
        stop.set()
        watcher.join()
    assert [answer.headers["X-Cache"] for answer in answers] == ["MISS", "HIT"]
    assert all("X-Cache-Rows" not in answer.headers for answer in answers)  # not split into rows
    assert statistics.median(latencies) < 0.05 and max(latencies) < 0.5


def test_only_if_cached_can_be_turned_off_for_the_shared_partition(
    tmp_path: Path, upstream: Upstream
) -> None:
    path = "/v1/embeddings"
    with start_proxy(tmp_path, "--set", "only_if_cached_shared=false") as proxy, proxy.session() as session:
        body = {"input": "somebody else's secret text", "model": "m"}
        session.post(upstream.url(path), json=body, timeout=30)
        calls = upstream.calls(path)
        probe = session.post(
            upstream.url(path),
            json={"input": "a text nobody sent", "model": "m"},
            headers={"Cache-Control": "only-if-cached"},
            timeout=30,
        )
        keyed = session.post(
            upstream.url(path),
            json={"input": "another text", "model": "m"},
            headers={"Cache-Control": "only-if-cached", "Authorization": "Bearer mine"},
            timeout=30,
        )
    assert probe.status_code == 200 and upstream.calls(path) == calls + 1  # answered, not a 504 oracle
    assert keyed.status_code == 504  # a credential's own partition keeps the directive
    assert json.loads(keyed.content)["error"]["code"] == "not_cached"
