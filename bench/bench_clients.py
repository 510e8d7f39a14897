"""A cache hit through the proxy, for every HTTP client on this machine, next to what the model costs.

    .venv/bin/python bench/bench_clients.py [--quick]

One run measures, on 127.0.0.1 with keep-alive connections and every process stopped by PID:

    direct MiniLM   a `requests` Session straight to `model-api serve` (all-MiniLM-L6-v2 computing one
                    new sentence each time), p50
    clients         the same MiniLM request again and again through `forward-proxy run` (all hits), one
                    connection per client and round, three interleaved rounds, p50: a `requests` Session (Nagle on, as urllib3 leaves it for
                    proxies), client-app's session (`NoDelayAdapter`), httpx, aiohttp, the openai SDK,
                    curl (many URLs on one command line: one connection), Java's java.net.http and
                    HttpURLConnection (when `java` is a JDK), Node's undici ProxyAgent (when `node` finds
                    `undici`, e.g. through NODE_PATH)
    floor           every client again, against `clients/instant_server.py` (it answers at once with
                    the hit's bytes, quick ACKs like the proxy's): what the client costs on its own, so
                    that what the proxy adds (hit minus floor) can be compared across clients
    tail            16 clients at once, the same MiniLM hit (an 8 KB answer), p50 and p99, with the
                    proxy's garbage-collector tuning on (the default) and off (`gc_tuning=false`),
                    interleaved rounds
    peers           an 85-byte answer from a trivial upstream through `forward-proxy run` (hit), bare
                    `mitmdump`, Squid (forwarding) and nginx caching POSTs (reverse: the hit's
                    physical limit), each where installed; a raw keep-alive client and a `requests`
                    Session, p50 (LiteLLM's cache, an OpenAI gateway with its own configuration, is
                    not run by this script); then every client again through Squid, to show which
                    ones wait for a delayed ACK with a proxy that does not acknowledge at once

then prints the ratios the targets are about (issue 13):

    every client's hit p50 <= 1.5 x the fastest client's + 0.5 ms
    the same bound on what the proxy adds to each client (hit p50 minus its floor p50)
    requests Session hit p50 <= 0.15 x direct MiniLM p50
    c=16 hit p99 <= 2 x its p50 (8 KB answer)

What is not installed is skipped, and the run says so. Bounded: a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import requests  # noqa: E402
from bench_proxy import bare_mitmdump, load, request_bytes, trivial_upstream  # noqa: E402

from client_app.client import NoDelayAdapter  # noqa: E402
from tests.support.model_server import start_model_api  # noqa: E402
from tests.support.processes import ManagedProcess, free_port, wait_for_port  # noqa: E402
from tests.support.proxy import start_proxy  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
PATH = "/v1/embeddings"
SENTENCE = "The proxy caches identical inference requests."
BODY = json.dumps({"input": [SENTENCE], "model": MODEL})
CLIENTS_DIR = Path(__file__).resolve().parent / "clients"


@dataclass
class Timing:
    """Seconds per request, and the X-Cache values seen."""

    latencies: list[float] = field(default_factory=list)
    cache: dict[str, int] = field(default_factory=dict)

    def add(self, seconds: float, cache: str | None) -> None:
        self.latencies.append(seconds)
        self.cache[cache or "-"] = self.cache.get(cache or "-", 0) + 1

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    def note(self, expected: str | None = "HIT") -> str:
        if expected is None or self.cache.get(expected, 0) == len(self.latencies):
            return ""
        return f"  (X-Cache seen: {self.cache})"


# --- the clients: each sends `count` identical POSTs on one connection ------------------------------


def timed(count: int, send: Callable[[], str | None]) -> Timing:
    timing = Timing()
    for _ in range(count):
        started = time.perf_counter()
        cache = send()
        timing.add(time.perf_counter() - started, cache)
    return timing


def requests_session(
    proxy: str | None, url: str, count: int, nodelay: bool = False, body: str = BODY
) -> Timing:
    with requests.Session() as session:
        session.trust_env = False
        if proxy is not None:
            session.proxies = {"http": proxy, "https": proxy}
        if nodelay:
            session.mount("http://", NoDelayAdapter())
        payload = json.loads(body)
        return timed(count, lambda: session.post(url, json=payload, timeout=30).headers.get("X-Cache"))


def httpx_client(proxy: str, url: str, count: int) -> Timing:
    import httpx

    with httpx.Client(proxy=proxy, trust_env=False) as client:
        payload = json.loads(BODY)
        return timed(count, lambda: client.post(url, json=payload, timeout=30).headers.get("X-Cache"))


def aiohttp_client(proxy: str, url: str, count: int) -> Timing:
    import aiohttp

    async def run() -> Timing:
        timing = Timing()
        payload = json.loads(BODY)
        async with aiohttp.ClientSession() as session:
            for _ in range(count):
                started = time.perf_counter()
                async with session.post(url, json=payload, proxy=proxy) as response:
                    await response.read()
                timing.add(time.perf_counter() - started, response.headers.get("X-Cache"))
        return timing

    return asyncio.run(run())


def openai_sdk(proxy: str, url: str, count: int) -> Timing:
    import openai

    base_url = url.removesuffix("/embeddings")
    with openai.DefaultHttpxClient(proxy=proxy, trust_env=False) as http_client:
        client = openai.OpenAI(base_url=base_url, api_key="unused", http_client=http_client, max_retries=0)
        embeddings = client.embeddings.with_raw_response

        def send() -> str | None:
            return embeddings.create(model=MODEL, input=[SENTENCE]).headers.get("X-Cache")

        return timed(count, send)


# Requests a client program sends before those measured, in the same process: a long-running service is
# warm, and a JVM compiles its HTTP client's hot code only after a thousand requests or so (java.net.http
# took 1.9 ms per request after 30, 0.8 ms after 3,000, through Squid). A Python client in this process is
# warm from its earlier rounds.
WARMUP = {"curl": 30, "java": 1500, "node": 300}


def external(argv: list[str], warmup: int, timeout: float = 180) -> Timing:
    """A program that prints `MILLISECONDS X-CACHE` per request; its first `warmup` lines are left out."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} exited with {done.returncode}: {done.stderr[-500:]}")
    timing = Timing()
    for line in done.stdout.split("\n")[warmup:]:
        if line.strip():
            milliseconds, _, cache = line.strip().partition(" ")
            timing.add(float(milliseconds) / 1000, cache)
    return timing


def curl(proxy: str, url: str, count: int) -> Timing:
    argv = ["curl", "-s", "--proxy", proxy, "-H", "Content-Type: application/json", "--data-binary", BODY]
    argv += ["-w", r"%{time_total} %header{x-cache}\n"]
    for _ in range(WARMUP["curl"] + count):
        argv += [url, "-o", "/dev/null"]  # one command line: curl reuses the connection
    timing = external(argv, WARMUP["curl"])
    timing.latencies = [seconds * 1000 for seconds in timing.latencies]  # curl prints seconds
    return timing


def java(mode: str) -> Callable[[str, str, int], Timing]:
    def run(proxy: str, url: str, count: int) -> Timing:
        host, port = proxy.removeprefix("http://").rsplit(":", 1)
        source = str(CLIENTS_DIR / "JavaClients.java")
        argv = ["java", source, mode, host, port, url, BODY, str(WARMUP["java"] + count)]
        return external(argv, WARMUP["java"])

    return run


def undici(proxy: str, url: str, count: int) -> Timing:
    argv = ["node", str(CLIENTS_DIR / "undici_client.js"), proxy, url, BODY, str(WARMUP["node"] + count)]
    return external(argv, WARMUP["node"])


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def has_jdk() -> bool:
    return shutil.which("java") is not None and shutil.which("javac") is not None


def has_undici() -> bool:
    if shutil.which("node") is None:
        return False
    found = subprocess.run(["node", "-e", "require.resolve('undici')"], capture_output=True, timeout=30)
    return found.returncode == 0


Client = Callable[[str, str, int], Timing]
CLIENTS: list[tuple[str, Callable[[], bool], str, Client]] = [
    # name, is it here, what to install when not, how to run it
    ("requests Session", lambda: True, "", requests_session),
    (
        "client-app (requests, NoDelayAdapter)",
        lambda: True,
        "",
        lambda p, u, n: requests_session(p, u, n, nodelay=True),
    ),
    ("httpx", lambda: importable("httpx"), "pip install httpx", httpx_client),
    ("aiohttp", lambda: importable("aiohttp"), "pip install aiohttp", aiohttp_client),
    ("openai SDK", lambda: importable("openai"), "pip install openai", openai_sdk),
    ("curl, one connection", lambda: shutil.which("curl") is not None, "apt-get install curl", curl),
    ("Java java.net.http", has_jdk, "a JDK (11+)", java("httpclient")),
    ("Java HttpURLConnection", has_jdk, "a JDK (11+)", java("urlconnection")),
    ("Node undici ProxyAgent", has_undici, "node and `npm install undici` (NODE_PATH)", undici),
]


def each_client(proxy: str, url: str, count: int, expected: str | None, rounds: int = 3) -> dict[str, Timing]:
    """Every client found here, `count` requests each in `rounds` interleaved rounds (so a passing load on
    the machine hits every client alike); each round on a new connection."""
    present: list[tuple[str, Client]] = []
    for name, found, install, client in CLIENTS:
        if found():
            present.append((name, client))
        else:
            print(f"  {name:38} not found ({install}), left out")
    results = {name: Timing() for name, _ in present}
    failed: dict[str, str] = {}
    for round_number in range(rounds):
        for name, client in present:
            if name in failed:
                continue
            try:
                if round_number == 0:
                    client(proxy, url, 5)  # its first request may be a miss
                timing = client(proxy, url, max(count // rounds, 1))
            except Exception as exc:  # one client's failure must not hide the others' figures
                failed[name] = f"{type(exc).__name__}: {exc}"
                continue
            results[name].latencies += timing.latencies
            for value, seen in timing.cache.items():
                results[name].cache[value] = results[name].cache.get(value, 0) + seen
    for name, _ in present:
        if name in failed:
            print(f"  {name:38} failed: {failed[name]}")
            del results[name]
        else:
            print(f"  {name:38} p50 {results[name].p50_ms:7.2f} ms{results[name].note(expected)}", flush=True)
    return results


# --- peers -----------------------------------------------------------------------------------------


SQUID_CONF = """http_port 127.0.0.1:{port}
http_access allow all
cache deny all
access_log none
cache_log {work}/squid-cache.log
pid_filename {work}/squid.pid
coredump_dir {work}
shutdown_lifetime 1 seconds
"""

NGINX_CONF = """daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    proxy_cache_path {work}/nginx-cache keys_zone=answers:10m;
    upstream model {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        client_body_buffer_size 64k;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache answers;
            proxy_cache_methods POST;
            proxy_cache_key "$request_method$request_uri|$request_body";
            proxy_cache_valid 200 1h;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
}}
"""


def writable_by_anyone(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o777)
    directory.parent.chmod(0o755)  # the run's temporary directory is 0700


@contextmanager
def squid(work: Path) -> Iterator[int]:
    port = free_port()
    writable_by_anyone(work)  # run as root, squid drops to its own user for its log files
    conf = work / "squid.conf"
    conf.write_text(SQUID_CONF.format(port=port, work=work))
    process = ManagedProcess(["squid", "-N", "-f", str(conf)], work / "squid.log").start()
    try:
        assert process.proc is not None
        wait_for_port("127.0.0.1", port, timeout=30, proc=process.proc)
        yield port
    finally:
        process.stop()


@contextmanager
def nginx(work: Path, upstream: int) -> Iterator[int]:
    port = free_port()
    writable_by_anyone(work)  # run as root, nginx's workers run as its own user
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(port=port, work=work, upstream=upstream))
    process = ManagedProcess(["nginx", "-c", str(conf), "-p", str(work)], work / "nginx.log").start()
    try:
        assert process.proc is not None
        wait_for_port("127.0.0.1", port, timeout=30, proc=process.proc)
        yield port
    finally:
        process.stop()


def raw_p50(port: int, request: bytes, count: int) -> Timing:
    """A raw keep-alive client (bench_proxy's load generator, Nagle off), one connection."""
    result = asyncio.run(load(port, lambda index: request, count, 1, 60))
    timing = Timing(result.latencies, dict(result.cache))
    return timing


def peer_rows(work: Path, count: int) -> None:
    print("\npeers: an 85-byte answer (trivial upstream), one keep-alive connection, p50", flush=True)
    body = json.dumps({"input": [SENTENCE], "model": "trivial"}).encode()
    with ExitStack() as stack:
        upstream = stack.enter_context(trivial_upstream(work))
        url = f"http://127.0.0.1:{upstream}{PATH}"
        forward_request = request_bytes(upstream, True, body)
        reverse_request = request_bytes(upstream, False, body)
        rows: list[tuple[str, int, bool, str | None]] = []  # name, port, via a proxy, X-Cache expected
        proxy = stack.enter_context(start_proxy(work, cache_dir=work / "peer-cache"))
        rows.append(("forward-proxy hit", proxy.port, True, "HIT"))
        rows.append(("bare mitmdump forwarding", stack.enter_context(bare_mitmdump(work)), True, None))
        for name, binary, install, start, forward in (
            ("Squid forwarding", "squid", "apt-get install squid", lambda: squid(work / "squid"), True),
            (
                "nginx POST-cache hit (reverse)",
                "nginx",
                "apt-get install nginx-light",
                lambda: nginx(work / "nginx", upstream),
                False,
            ),
        ):
            if shutil.which(binary) is None:
                print(f"  {name}: not installed ({install}), row left out")
                continue
            try:
                port = stack.enter_context(start())
            except Exception as exc:  # a peer that does not start must not hide the other rows
                print(f"  {name}: did not start ({type(exc).__name__}: {exc}), row left out")
                continue
            rows.append((name, port, forward, None if forward else "HIT"))
        print(
            "  LiteLLM cache: not measured by this script (an OpenAI gateway with its own config; "
            "issue 13 has a figure)"
        )
        for name, port, forward, expected in rows:
            request = forward_request if forward else reverse_request
            raw_p50(port, request, 20)  # warm: the first is a miss where the peer caches
            raw = raw_p50(port, request, count)
            target = url if forward else f"http://127.0.0.1:{port}{PATH}"
            proxy_url = f"http://127.0.0.1:{port}" if forward else None
            requests_session(proxy_url, target, 5, body=body.decode())  # its first may be a miss
            session_timing = requests_session(proxy_url, target, count, body=body.decode())
            print(
                f"  {name:32} raw {raw.p50_ms:7.2f} ms   requests Session {session_timing.p50_ms:7.2f} ms"
                f"{raw.note(expected)}{session_timing.note(expected)}",
                flush=True,
            )
        squid_port = next((port for name, port, _, _ in rows if name.startswith("Squid")), None)
        if squid_port is not None:
            print(f"\nclients through Squid forwarding (85-byte answer), {count // 4} requests each, p50")
            each_client(f"http://127.0.0.1:{squid_port}", url, count // 4, None)


# --- the run ---------------------------------------------------------------------------------------


def direct_minilm(api: str, count: int) -> Timing:
    with requests.Session() as session:
        session.trust_env = False
        timing = Timing()
        for index in range(count):
            payload = {"input": [f"{SENTENCE} direct {os.getpid()} {time.time()} {index}"], "model": MODEL}
            started = time.perf_counter()
            session.post(f"{api}{PATH}", json=payload, timeout=60).raise_for_status()
            timing.add(time.perf_counter() - started, None)
        return timing


@contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection in this process (the load generator) while it measures the proxy's tail:
    its own pauses would count as the proxy's."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def client_floors(work: Path, proxy: str, url: str, count: int) -> dict[str, Timing]:
    """Each client against `clients/instant_server.py` (as its proxy), which answers every request at once
    with the bytes of the proxy's hit: what the client itself costs per request, nothing in the way."""
    with requests.Session() as session:
        session.trust_env = False
        session.proxies = {"http": proxy}
        hit = session.post(url, data=BODY, headers={"Content-Type": "application/json"}, timeout=30).content
    answer = work / "hit-answer.json"
    answer.write_bytes(hit)
    port = free_port("127.0.0.1")
    script = str(Path(__file__).resolve().parent / "clients" / "instant_server.py")
    server = ManagedProcess([sys.executable, script, str(port), str(answer)], work / "instant.log").start()
    try:
        wait_for_port("127.0.0.1", port, 30)
        return each_client(f"http://127.0.0.1:{port}", url, count, "HIT")
    finally:
        server.stop()


def tail(work: Path, upstream: int, total: int, rounds: int) -> dict[str, list[float]]:
    """c=16 hits of the MiniLM answer through two proxies, gc tuning on and off, rounds interleaved."""
    request = request_bytes(upstream, True, BODY.encode())
    latencies: dict[str, list[float]] = {"gc_tuning=true": [], "gc_tuning=false": []}
    with ExitStack() as stack:
        ports = {
            setting: stack.enter_context(
                start_proxy(work, "--set", setting, cache_dir=work / f"tail-{setting}")
            ).port
            for setting in latencies
        }
        for port in ports.values():
            asyncio.run(load(port, lambda index: request, 200, 16, 60))  # the miss, then warm
        stack.enter_context(collector_paused())
        for _ in range(rounds):
            for setting, port in ports.items():
                result = asyncio.run(load(port, lambda index: request, total, 16, 60))
                if result.cache.get("HIT", 0) != len(result.latencies):
                    print(f"  ({setting}: X-Cache seen {result.cache})")
                latencies[setting] += result.latencies
    return latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    count = 60 if args.quick else 240
    tail_total, tail_rounds = (500, 1) if args.quick else (2000, 3)

    work = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    print(f"bench_clients: work directory {work}, {os.cpu_count()} CPUs", flush=True)
    try:
        with ExitStack() as stack:
            model_process, api = start_model_api(work, "--device", "cpu", "--model", MODEL)
            stack.callback(model_process.stop)
            upstream = int(api.rsplit(":", 1)[1])
            direct = direct_minilm(api, 10)
            direct = direct_minilm(api, max(count // 4, 30))
            print(f"direct MiniLM (requests Session, computing)   p50 {direct.p50_ms:7.2f} ms", flush=True)

            proxy = stack.enter_context(start_proxy(work, cache_dir=work / "clients-cache"))
            url = f"{api}{PATH}"
            print(f"\nclients: the same MiniLM request through forward-proxy run, {count} hits each, p50")
            results = each_client(proxy.url, url, count, "HIT")
            print("\nfloor: the same clients against a server that answers at once with the hit's bytes, p50")
            floors = client_floors(work, proxy.url, url, count)
            print(f"\ntail: 16 clients at once, the MiniLM hit (8 KB answer), {tail_rounds} x {tail_total}")
            tails = tail(work, upstream, tail_total, tail_rounds)
            for setting, values in tails.items():
                print(
                    f"  {setting:16} p50 {percentile(values, 0.5):7.2f} ms   p99 {percentile(values, 0.99):7.2f} ms",
                    flush=True,
                )
        peer_rows(work, count)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nratios (target in brackets)")
    if results:
        fastest_name = min(results, key=lambda name: results[name].p50_ms)
        fastest = results[fastest_name].p50_ms
        print(f"  fastest client: {fastest_name}, {fastest:.2f} ms")
        for name, timing in results.items():
            bound = 1.5 * fastest + 0.5
            verdict = "ok" if timing.p50_ms <= bound else "OVER"
            print(
                f"  {name:38} hit p50 / fastest = {timing.p50_ms / fastest:5.2f}x  "
                f"[<= 1.5x + 0.5 ms = {bound:.2f} ms: {verdict}]"
            )
        # The same bound on what the proxy adds (hit minus the client's own floor): a ratio of the totals
        # gets harder the faster the proxy is, for a client whose own cost is high.
        added = {name: results[name].p50_ms - floors[name].p50_ms for name in results if name in floors}
        if added:
            least = min(added.values())
            for name, extra in added.items():
                bound = 1.5 * least + 0.5
                verdict = "ok" if extra <= bound else "OVER"
                print(
                    f"  {name:38} hit - floor = {extra:5.2f} ms (floor {floors[name].p50_ms:5.2f})  "
                    f"[<= 1.5 x {least:.2f} + 0.5 ms = {bound:.2f} ms: {verdict}]"
                )
    if "requests Session" in results:
        ratio = results["requests Session"].p50_ms / direct.p50_ms
        print(f"  requests Session hit p50 / direct MiniLM p50 = {ratio:6.3f}  [<= 0.15]")
    for setting, values in tails.items():
        ratio = percentile(values, 0.99) / percentile(values, 0.5)
        print(f"  c=16 hit p99 / p50, 8 KB answer, {setting:16} = {ratio:5.2f}  [<= 2]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
