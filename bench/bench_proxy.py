"""How much the caching proxy costs and saves, measured in one run.

    .venv/bin/python bench/bench_proxy.py [--quick] [--skip-model]

For two upstreams, a trivial HTTP server (the proxy's own overhead dominates) and the real model API
computing one MiniLM sentence, it sends POST /v1/embeddings requests at concurrency 1 and 16 over
keep-alive connections:

    direct      straight to the upstream
    mitmdump    through a bare `mitmdump` (no addons): mitmproxy's forwarding cost
    miss        through `forward-proxy run`, every request new (looked up, fetched, stored)
    hit         through `forward-proxy run`, the same request again (served from the cache)
    cache-only hit   through mitmdump with the cache addon alone
    redis miss  as miss, with `--cache-backend redis://...` (a local redis-server, maxmemory + LRU)
    redis hit   as hit, from Redis
    2 workers hit    as hit, through `forward-proxy run --workers 2` (concurrency 16 only; compare
                with `hit`, one worker)

and prints p50/p99 latency and requests per second, then the ratios the targets are about:

    hit p50 <= 0.2 x direct MiniLM p50
    hit throughput >= bare mitmdump forwarding throughput (trivial upstream)
    a miss adds <= 0.5 ms p50 over bare mitmdump (trivial upstream)

and, without targets, what Redis costs against the cache directory and what a second worker adds to hit
throughput (on a machine with at least 2 cores free for the proxy; the load generator is one Python
process and may itself be the limit).

Every process runs on 127.0.0.1 and is stopped by PID; the whole run is bounded (a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.forward_proxy.redis.running import start_workers  # noqa: E402
from tests.support.model_server import start_model_api  # noqa: E402
from tests.support.processes import ManagedProcess, console_script, free_port, wait_for_port  # noqa: E402
from tests.support.proxy import start_proxy  # noqa: E402
from tests.support.redis_server import RedisServer, redis_available  # noqa: E402

PATH = "/v1/embeddings"
MODEL = "all-MiniLM-L6-v2"


# --- the trivial upstream (run as a child process of this script) -------------------------------------


class _TrivialProtocol(asyncio.Protocol):
    BODY = b'{"object":"list","data":[{"object":"embedding","embedding":[0.1,0.2,0.3],"index":0}]}'
    RESPONSE = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-model-version: bench-1\r\n"
        b"content-length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            marker = head.find(b"content-length:")
            if marker >= 0:
                length = int(head[marker + 15 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(self.RESPONSE)


def serve_trivial(port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_TrivialProtocol, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- the load generator ----------------------------------------------------------------------------


@dataclass
class Result:
    latencies: list[float]
    seconds: float
    cache: dict[str, int]  # X-Cache values seen
    errors: int

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, str]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length, cache = 0, "-"
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"x-cache":
            cache = value.strip().decode()
    await reader.readexactly(length)
    return status, cache


async def load(
    port: int, make_request: Callable[[int], bytes], total: int, concurrency: int, max_seconds: float
) -> Result:
    counter = itertools.count()
    latencies: list[float] = []
    cache: dict[str, int] = {}
    errors = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**22)
        try:
            while (index := next(counter)) < total and time.perf_counter() < deadline:
                request = make_request(index)
                started = time.perf_counter()
                status, decision = await _exchange(reader, writer, request)
                latencies.append(time.perf_counter() - started)
                cache[decision] = cache.get(decision, 0) + 1
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(latencies, time.perf_counter() - started, cache, errors)


def request_bytes(origin_port: int, via_proxy: bool, body: bytes) -> bytes:
    target = f"http://127.0.0.1:{origin_port}{PATH}" if via_proxy else PATH
    return (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


# --- processes -------------------------------------------------------------------------------------


@contextmanager
def trivial_upstream(work: Path) -> Iterator[int]:
    port = free_port()
    process = ManagedProcess(
        [sys.executable, __file__, "--serve-trivial", str(port)], work / "trivial.log"
    ).start()
    try:
        assert process.proc is not None
        wait_for_port("127.0.0.1", port, proc=process.proc)
        yield port
    finally:
        process.stop()


@contextmanager
def model_upstream(work: Path) -> Iterator[int]:
    process, url = start_model_api(work, "--device", "cpu", "--model", MODEL)
    try:
        yield int(url.rsplit(":", 1)[1])
    finally:
        process.stop()


@contextmanager
def mitmdump(work: Path, name: str, *extra: str) -> Iterator[int]:
    """`mitmdump -q` on a free loopback port with its own confdir, and `extra` arguments."""
    port = free_port()
    argv = [console_script("mitmdump"), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port)]
    argv += ["--set", f"confdir={work / (name + '-conf')}", *extra]
    process = ManagedProcess(argv, work / f"{name}.log").start()
    try:
        assert process.proc is not None
        wait_for_port("127.0.0.1", port, timeout=60, proc=process.proc)
        yield port
    finally:
        process.stop()


def bare_mitmdump(work: Path) -> contextlib.AbstractContextManager[int]:
    """mitmdump without addons: mitmproxy's own forwarding cost."""
    return mitmdump(work, "mitmdump")


@contextmanager
def forward_proxy(work: Path) -> Iterator[int]:
    proxy = start_proxy(work, "--set", f"confdir={work / 'proxy-conf'}")
    try:
        yield proxy.port
    finally:
        proxy.stop()


@contextmanager
def redis_proxy(work: Path) -> Iterator[int | None]:
    """`forward-proxy run --cache-backend redis://...` on a local redis-server; None without one."""
    if not redis_available():
        print("bench_proxy: no redis-server installed, the redis rows are left out", flush=True)
        yield None
        return
    with RedisServer(work, "--maxmemory", "256mb", "--maxmemory-policy", "volatile-lru") as server:
        proxy = start_proxy(
            work,
            "--cache-backend",
            server.url,
            "--set",
            f"confdir={work / 'proxy-conf'}",
            cache_dir=work / "redis-proxy-cache",
        )
        try:
            yield proxy.port
        finally:
            proxy.stop()


@contextmanager
def two_workers(work: Path) -> Iterator[int]:
    """`forward-proxy run --workers 2` on the cache directory."""
    proxy = start_workers(
        work, 2, "--set", f"confdir={work / 'proxy-conf'}", cache_dir=work / "workers-cache"
    )
    try:
        yield proxy.port
    finally:
        proxy.stop()


# --- the run ---------------------------------------------------------------------------------------


def body_for(kind: str, label: str) -> bytes:
    model = MODEL if kind == "minilm" else "trivial"
    return json.dumps({"input": [f"benchmark sentence {label}"], "model": model}).encode()


def same_request(request: bytes, index: int) -> bytes:
    return request


def new_request(kind: str, upstream_port: int, via_proxy: bool, salt: str, index: int) -> bytes:
    return request_bytes(upstream_port, via_proxy, body_for(kind, f"{salt} {index}"))


PATHS = ("direct", "mitmdump", "miss", "hit", "cache-only hit", "redis miss", "redis hit", "2 workers hit")
ONLY_CONCURRENT = frozenset({"2 workers hit"})  # a second worker only helps with concurrent clients


def paths_at(concurrency: int, ports: dict[str, int]) -> list[str]:
    return [
        path
        for path in PATHS
        if (path == "direct" or path in ports) and (concurrency > 1 or path not in ONLY_CONCURRENT)
    ]


def measure(
    kind: str, upstream_port: int, ports: dict[str, int], counts: dict[str, int], rounds: int, run_id: str
) -> dict[tuple[str, int], Result]:
    """Every path in turn, `rounds` times (so a load change on the machine hits all paths alike)."""
    results: dict[tuple[str, int], Result] = {}
    for concurrency in (1, 16):
        total = counts[kind] * (2 if concurrency > 1 else 1)
        paths = paths_at(concurrency, ports)
        round_rps: dict[str, list[float]] = {path: [] for path in paths}
        for round_number in range(rounds):
            for path in paths:
                port = ports.get(path, upstream_port)
                via_proxy = path != "direct"
                salt = f"{run_id}-{kind}-{path}-{concurrency}-{round_number}"
                make: Callable[[int], bytes]
                if path.endswith("hit"):
                    make = partial(
                        same_request, request_bytes(upstream_port, via_proxy, body_for(kind, "same"))
                    )
                else:
                    make = partial(new_request, kind, upstream_port, via_proxy, salt)
                warmup = 10 if kind == "minilm" else 50
                warm = partial(new_request, kind, upstream_port, via_proxy, salt + "-warmup")
                asyncio.run(load(port, make if path.endswith("hit") else warm, warmup, concurrency, 60))
                result = asyncio.run(load(port, make, total, concurrency, 120))
                round_rps[path].append(result.rps)
                if (path, concurrency) in results:
                    previous = results[(path, concurrency)]
                    previous.latencies += result.latencies
                    previous.seconds += result.seconds
                    previous.errors += result.errors
                    for name, count in result.cache.items():
                        previous.cache[name] = previous.cache.get(name, 0) + count
                else:
                    results[(path, concurrency)] = result
        for path in paths:
            result = results[(path, concurrency)]
            expected = "HIT" if path.endswith("hit") else "MISS" if path.endswith("miss") else None
            note = ""
            if expected and result.cache.get(expected, 0) != len(result.latencies):
                note = f"  (X-Cache seen: {result.cache})"
            if result.errors:
                note += f"  ({result.errors} non-200 answers)"
            result.seconds = len(result.latencies) / statistics.median(round_rps[path])  # median round rate
            print(
                f"{kind:8} c={concurrency:<3} {path:15} n={len(result.latencies):5}  p50 {result.p50_ms:8.3f} ms  "
                f"p99 {result.p99_ms:8.3f} ms  {result.rps:8.1f} req/s{note}",
                flush=True,
            )
    return results


def cache_only_mitmdump(work: Path) -> contextlib.AbstractContextManager[int]:
    """mitmdump with the cache addon alone: what the cache costs without the other addons."""
    script = work / "cache_only.py"
    script.write_text("from forward_proxy.cache.addon import Cache\n\naddons = [Cache()]\n")
    return mitmdump(work, "cache-only", "-s", str(script), "--set", f"cache_dir={work / 'cache-only-cache'}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve-trivial", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--skip-model", action="store_true", help="only the trivial upstream")
    args = parser.parse_args()
    if args.serve_trivial:
        serve_trivial(args.serve_trivial)
        return 0

    counts = {"trivial": 200, "minilm": 20} if args.quick else {"trivial": 700, "minilm": 60}
    rounds = 1 if args.quick else 3
    run_id = f"{os.getpid()}-{time.time():.0f}"
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    print(f"bench_proxy: work directory {work}, {os.cpu_count()} CPUs", flush=True)
    results: dict[str, dict[tuple[str, int], Result]] = {}
    try:
        with (
            bare_mitmdump(work) as mitmdump_port,
            forward_proxy(work) as proxy_port,
            cache_only_mitmdump(work) as cache_only_port,
            redis_proxy(work) as redis_port,
            two_workers(work) as workers_port,
        ):
            ports = {"mitmdump": mitmdump_port, "miss": proxy_port, "hit": proxy_port}
            ports["cache-only hit"] = cache_only_port
            if redis_port is not None:
                ports["redis miss"] = ports["redis hit"] = redis_port
            ports["2 workers hit"] = workers_port
            with trivial_upstream(work) as port:
                results["trivial"] = measure("trivial", port, ports, counts, rounds, run_id)
            if not args.skip_model:
                with model_upstream(work) as port:
                    results["minilm"] = measure("minilm", port, ports, counts, rounds, run_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nratios (target in brackets)")
    trivial = results["trivial"]
    for concurrency in (1, 16):
        hit, bare, miss = (
            trivial[("hit", concurrency)],
            trivial[("mitmdump", concurrency)],
            trivial[("miss", concurrency)],
        )
        print(
            f"  trivial c={concurrency:<3} hit throughput / bare mitmdump throughput = "
            f"{hit.rps / bare.rps:6.2f}x  [>= 1.0]"
        )
        print(
            f"  trivial c={concurrency:<3} miss p50 - bare mitmdump p50            = "
            f"{miss.p50_ms - bare.p50_ms:+6.3f} ms  [<= +0.5 ms at c=1]"
        )
    for concurrency in (1, 16):
        if ("redis hit", concurrency) not in trivial:
            break
        redis_hit, redis_miss = trivial[("redis hit", concurrency)], trivial[("redis miss", concurrency)]
        hit, miss = trivial[("hit", concurrency)], trivial[("miss", concurrency)]
        print(
            f"  trivial c={concurrency:<3} redis hit throughput / disk hit throughput = "
            f"{redis_hit.rps / hit.rps:6.2f}x"
        )
        print(
            f"  trivial c={concurrency:<3} redis miss p50 - disk miss p50            = "
            f"{redis_miss.p50_ms - miss.p50_ms:+6.3f} ms"
        )
    two = trivial[("2 workers hit", 16)]
    print(
        f"  trivial c=16  2 workers hit throughput / 1 worker            = "
        f"{two.rps / trivial[('hit', 16)].rps:6.2f}x  (on {os.cpu_count()} CPUs)"
    )
    if "minilm" in results:
        minilm = results["minilm"]
        for concurrency in (1, 16):
            hit, direct = minilm[("hit", concurrency)], minilm[("direct", concurrency)]
            print(
                f"  minilm  c={concurrency:<3} hit p50 / direct p50                      = "
                f"{hit.p50_ms / direct.p50_ms:6.3f}x  [<= 0.2]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
