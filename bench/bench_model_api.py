"""How much does dynamic batching buy? Requests/s and latency of POST /v1/embeddings, batching on vs off.

Starts the real model server (from `.venv-model`) twice on a free loopback port, once with dynamic
batching and once with `--no-batching`, and drives each at concurrency 1 and 16 for a fixed time with
one short text per request (the shape of traffic that batching exists for). Prints requests/s, p50 and
p99 latency, the mean rows per forward pass (from `/stats`), and the throughput ratio on/off at the
highest concurrency, all measured in this one run.

    .venv/bin/python bench/bench_model_api.py [--duration 6] [--concurrency 1 16]

Needs only the standard library and `requests` (it runs in the proxy's environment); bounded to about
a minute and a half with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.model_server import start_model_api  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
SUBJECTS = ["the weather", "a database migration", "the football match", "tax returns", "a new recipe"]
WARMUP_REQUESTS = 20


@dataclass(frozen=True)
class Measurement:
    mode: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    rows_per_pass: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # never through an HTTP proxy of the environment
    return session


def _stats(url: str) -> tuple[int, int]:
    with _session() as session:
        model = session.get(f"{url}/stats", timeout=30).json()["models"][MODEL]
    return int(model["rows"]), int(model["batches"])


def drive(url: str, mode: str, concurrency: int, duration: float) -> Measurement:
    """`concurrency` threads, each sending one request after another until `duration` has passed."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = threading.Barrier(concurrency + 1)
    deadline = 0.0

    def worker(index: int) -> None:
        with _session() as session:
            start.wait()
            sent = 0
            while time.perf_counter() < deadline:
                text = (
                    f"Request {sent} of worker {index} is about {SUBJECTS[(index + sent) % len(SUBJECTS)]}."
                )
                began = time.perf_counter()
                response = session.post(
                    f"{url}/v1/embeddings", json={"input": text, "model": MODEL}, timeout=60
                )
                latencies[index].append(time.perf_counter() - began)
                errors[index] += response.status_code != 200
                sent += 1

    rows_before, passes_before = _stats(url)
    threads = [threading.Thread(target=worker, args=(index,)) for index in range(concurrency)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline = began + duration
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    rows_after, passes_after = _stats(url)
    every = [latency for worker_latencies in latencies for latency in worker_latencies]
    passes = passes_after - passes_before
    return Measurement(
        mode=mode,
        concurrency=concurrency,
        requests=len(every),
        errors=sum(errors),
        seconds=elapsed,
        p50_ms=statistics.median(every) * 1000,
        p99_ms=_percentile(every, 0.99) * 1000,
        rows_per_pass=(rows_after - rows_before) / passes if passes else 0.0,
    )


def run_mode(
    work: Path, mode: str, arguments: list[str], concurrencies: list[int], duration: float
) -> list[Measurement]:
    process, url = start_model_api(work, "--model", MODEL, "--log-level", "warning", *arguments)
    try:
        with _session() as session:
            for index in range(WARMUP_REQUESTS):
                session.post(
                    f"{url}/v1/embeddings", json={"input": f"warm up {index}"}, timeout=60
                ).raise_for_status()
        return [drive(url, mode, concurrency, duration) for concurrency in concurrencies]
    finally:
        process.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement (default: 6)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="levels (default: 1 16)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-model-api-") as folder:
        work = Path(folder)
        results = run_mode(work, "batching on", [], options.concurrency, options.duration)
        results += run_mode(work, "batching off", ["--no-batching"], options.concurrency, options.duration)
    print(f"POST /v1/embeddings, {MODEL}, one text per request, {options.duration:g} s per row")
    print(
        f"{'mode':<13} {'conc':>4} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'rows/pass':>9}"
    )
    for result in results:
        print(
            f"{result.mode:<13} {result.concurrency:>4} {result.requests:>8} {result.errors:>6} "
            f"{result.per_second:>8.1f} {result.p50_ms:>8.1f} {result.p99_ms:>8.1f} {result.rows_per_pass:>9.2f}"
        )
    top = max(options.concurrency)
    on = next(r for r in results if r.mode == "batching on" and r.concurrency == top)
    off = next(r for r in results if r.mode == "batching off" and r.concurrency == top)
    print(f"throughput batching on / off at concurrency {top}: {on.per_second / off.per_second:.2f}x")
    return 1 if any(result.errors for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
