"""How much does dynamic batching buy, and binary tensors over JSON? Requests/s, latency, bytes.

Starts the real model server (from `.venv-model`) twice on a free loopback port, once with dynamic
batching and once with `--no-batching`, and drives each at concurrency 1 and 16 for a fixed time with
one short text per request (the shape of traffic that batching exists for). Prints requests/s, p50 and
p99 latency, the mean rows per forward pass (from `/stats`), and the throughput ratio on/off at the
highest concurrency, all measured in this one run.

Then it serves the digits example and sends `POST /v2/models/digits/infer` with a 64x64 FP32 batch (64
rows of 64 pixels) back to back for a fixed time, once as JSON and once with the binary tensor data
extension (raw input and outputs, as tritonclient sends them by default), and prints the bytes on the
wire per request (request and response bodies) and requests/s of each.

    .venv/bin/python bench/bench_model_api.py [--duration 6] [--concurrency 1 16] [--part batching|binary]

Needs only the standard library and `requests` (it runs in the proxy's environment); bounded to about
a minute and a half with the defaults.
"""

from __future__ import annotations

import argparse
import array
import json
import random
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

from tests.support.model_server import export_digits, start_model_api  # noqa: E402

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


@dataclass(frozen=True)
class WireMeasurement:
    encoding: str
    requests: int
    errors: int
    seconds: float
    request_bytes: int
    response_bytes: int

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


BATCH_ROWS, PIXELS = 64, 64


def tensor_requests() -> dict[str, tuple[bytes, dict[str, str]]]:
    """The same 64x64 FP32 batch as a JSON body and as a binary one (JSON header, then the raw floats)."""
    # Pixels in [0, 1) as float32, written to JSON as a client's `tolist()` of them is (up to 17 digits).
    generator = random.Random(0)
    raw = array.array("f", [generator.random() for _ in range(BATCH_ROWS * PIXELS)])
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [BATCH_ROWS, PIXELS]}
    as_json = json.dumps({"inputs": [{**tensor, "data": raw.tolist()}]}).encode()
    if sys.byteorder == "big":
        raw.byteswap()  # the extension is little-endian
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw) * raw.itemsize}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return {
        "json": (as_json, {"Content-Type": "application/json"}),
        "binary": (
            header + raw.tobytes(),
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        ),
    }


def labels_of(response: requests.Response) -> list[int]:
    """The predicted digits of an answer, whichever its encoding."""
    header = response.headers.get("Inference-Header-Content-Length")
    if header is None:
        outputs = response.json()["outputs"]
        return [int(value) for value in next(o for o in outputs if o["name"] == "label")["data"]]
    answer = json.loads(response.content[: int(header)])
    offset = int(header)
    for output in answer["outputs"]:
        size = int(output["parameters"]["binary_data_size"])
        if output["name"] == "label":
            labels = array.array("q", response.content[offset : offset + size])
            if sys.byteorder == "big":
                labels.byteswap()
            return labels.tolist()
        offset += size
    raise ValueError("no label output")


def drive_tensors(
    url: str, encoding: str, body: bytes, headers: dict[str, str], duration: float
) -> WireMeasurement:
    """One client sending the same batch back to back for `duration` seconds."""
    requests_sent = errors = response_bytes = 0
    with _session() as session:
        began = time.perf_counter()
        while time.perf_counter() - began < duration:
            response = session.post(f"{url}/v2/models/digits/infer", data=body, headers=headers, timeout=60)
            errors += response.status_code != 200
            response_bytes += len(response.content)
            requests_sent += 1
        elapsed = time.perf_counter() - began
    return WireMeasurement(
        encoding, requests_sent, errors, elapsed, len(body), response_bytes // requests_sent
    )


def run_binary(work: Path, duration: float) -> list[WireMeasurement]:
    digits = export_digits(work / "digits.pt2")
    process, url = start_model_api(work, "--model", f"digits={digits}", "--log-level", "warning")
    try:
        bodies = tensor_requests()
        with _session() as session:
            answers = {
                encoding: session.post(
                    f"{url}/v2/models/digits/infer", data=body, headers=headers, timeout=60
                )
                for encoding, (body, headers) in bodies.items()
            }
            if labels_of(answers["json"]) != labels_of(answers["binary"]):
                raise SystemExit("the JSON and binary answers disagree")
            for _ in range(WARMUP_REQUESTS):
                for body, headers in bodies.values():
                    session.post(f"{url}/v2/models/digits/infer", data=body, headers=headers, timeout=60)
        return [drive_tensors(url, encoding, *bodies[encoding], duration) for encoding in ("json", "binary")]
    finally:
        process.stop()


def print_binary(results: list[WireMeasurement], duration: float) -> None:
    print(
        f"POST /v2/models/digits/infer, one {BATCH_ROWS}x{PIXELS} FP32 batch per request, {duration:g} s per row"
    )
    print(f"{'encoding':<8} {'requests':>8} {'errors':>6} {'req/s':>8} {'request B':>10} {'response B':>10}")
    for result in results:
        print(
            f"{result.encoding:<8} {result.requests:>8} {result.errors:>6} {result.per_second:>8.1f} "
            f"{result.request_bytes:>10} {result.response_bytes:>10}"
        )
    json_row, binary_row = results
    print(
        f"binary / JSON: {(binary_row.request_bytes + binary_row.response_bytes) / (json_row.request_bytes + json_row.response_bytes):.2f}x "
        f"the bytes, {binary_row.per_second / json_row.per_second:.2f}x the requests/s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement (default: 6)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="levels (default: 1 16)")
    parser.add_argument(
        "--part", choices=["batching", "binary"], help="run one part only (default: both, in one run)"
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-model-api-") as folder:
        work = Path(folder)
        results: list[Measurement] = []
        if options.part != "binary":
            results = run_mode(work, "batching on", [], options.concurrency, options.duration)
            results += run_mode(
                work, "batching off", ["--no-batching"], options.concurrency, options.duration
            )
        wire = run_binary(work, options.duration) if options.part != "batching" else []
    if results:
        print_batching(results, options)
    if wire:
        if results:
            print()
        print_binary(wire, options.duration)
    return 1 if any(result.errors for result in [*results, *wire]) else 0


def print_batching(results: list[Measurement], options: argparse.Namespace) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
