"""How much model work does per-item caching save when a corpus is re-embedded after a small change?

A corpus of deterministic chunks (1,000 by default, sentences of `client_app/data/docs.txt` recombined)
is embedded with the real model API (MiniLM, from `.venv-model`) in batches of 32; then 10% of the chunks,
spread over the corpus, are changed and the whole corpus is embedded again, as an indexing job does. The
re-embedding is measured three ways, each with a fresh cache:

    direct      straight to the model API (no proxy)
    whole       through `forward-proxy run --set per_item_cache=false`: a batch is a hit only if all of
                its 32 chunks are unchanged
    per-item    through `forward-proxy run` (per-item caching on): only the changed chunks go upstream
    no-tokens   the same, but the upstream is an OpenAI-style server that sends no `X-Input-Tokens`
                (a relay in front of the model API drops the header, as OpenAI, vLLM or TEI would
                never send it): the proxy must still store every row and ask one request per batch

Both per-item modes go through a counting relay, so the upstream requests per batch are printed too.

For each it prints the rows the model computed and its model seconds (both from the model API's
`GET /stats`), the wall time of the re-embedding, and the ratios to direct; then how far the per-item
answers are from the direct ones (they must agree to float tolerance).

    .venv/bin/python bench/bench_rows.py [--chunks 1000] [--batch 32] [--changed 0.1] [--quick]

Needs only the standard library and `requests` (it runs in the proxy's environment). About two to four
minutes on 2 cores with the defaults (more while other work shares them); `--quick` (200 chunks) under one.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.model_server import start_model_api  # noqa: E402
from tests.support.proxy import start_proxy  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
DOCS = REPO / "client_app" / "data" / "docs.txt"
TIMEOUT = 300


@dataclass(frozen=True)
class Pass:
    rows: int  # rows the model computed
    model_seconds: float  # time inside the model's forward passes
    wall_seconds: float  # from the first batch sent to the last answer read
    vectors: list[list[float]]
    partial: int  # batches answered partly from the cache (X-Cache: PARTIAL)
    hits: int  # batches answered wholly from the cache


def corpus(chunks: int, seed: int = 0) -> list[str]:
    """`chunks` distinct chunks of one or two sentences each (about 25 tokens)."""
    sentences = [line.strip() for line in DOCS.read_text().splitlines() if line.strip()]
    generator = random.Random(seed)
    return [
        f"Chunk {index}. " + " ".join(generator.sample(sentences, generator.randint(1, 2)))
        for index in range(chunks)
    ]


def changed(texts: list[str], fraction: float, seed: int = 1) -> tuple[list[str], int]:
    """The corpus with `fraction` of its chunks edited (spread at random), and how many were."""
    generator = random.Random(seed)
    edited = generator.sample(range(len(texts)), round(len(texts) * fraction))
    result = list(texts)
    for index in edited:
        result[index] = result[index].replace(f"Chunk {index}.", f"Chunk {index} (revised).")
    return result, len(edited)


def _session(proxy: str | None) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # only the proxy given, never the environment's
    if proxy is not None:
        session.proxies.update({"http": proxy, "https": proxy})
    return session


def _model_figures(url: str) -> tuple[int, float]:
    with _session(None) as session:
        figures = session.get(f"{url}/stats", timeout=TIMEOUT).json()["models"][MODEL]
    return int(figures["rows"]), float(figures["model_seconds"])


def embed_all(url: str, texts: list[str], batch: int, proxy: str | None, upstream: str | None = None) -> Pass:
    """The corpus in batches of `batch`, one request after another (as an indexing job sends them);
    `upstream` is where they are sent (the model API at `url`, or a relay in front of it)."""
    upstream = upstream or url
    rows_before, seconds_before = _model_figures(url)
    vectors: list[list[float]] = []
    partial = hits = 0
    began = time.perf_counter()
    with _session(proxy) as session:
        for start in range(0, len(texts), batch):
            answer = session.post(
                f"{upstream}/v1/embeddings",
                json={"model": MODEL, "input": texts[start : start + batch]},
                timeout=TIMEOUT,
            )
            answer.raise_for_status()
            vectors += [item["embedding"] for item in answer.json()["data"]]
            partial += answer.headers.get("X-Cache") == "PARTIAL"
            hits += answer.headers.get("X-Cache") == "HIT"
    wall = time.perf_counter() - began
    rows_after, seconds_after = _model_figures(url)
    return Pass(rows_after - rows_before, seconds_after - seconds_before, wall, vectors, partial, hits)


class Relay:
    """A loopback relay in front of the model API that counts embeddings requests and, for the
    `no-tokens` mode, drops `X-Input-Tokens` from the answers (an OpenAI-style upstream)."""

    def __init__(self, target: str, drop_tokens: bool) -> None:
        relay = self
        self.target, self.drop_tokens, self.requests = target, drop_tokens, 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/v1/embeddings"):
                    relay.requests += 1
                answer = relay.session.request(
                    self.command,
                    relay.target + self.path,
                    data=body or None,
                    headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
                    timeout=TIMEOUT,
                )
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    skip = name.lower() in ("content-length", "transfer-encoding", "connection")
                    if not skip and not (relay.drop_tokens and name.lower() == "x-input-tokens"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _relay

        self.session = _session(None)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.session.close()


@contextmanager
def through(work: Path, mode: str, url: str) -> Iterator[tuple[str | None, str, Relay | None]]:
    """(proxy URL or None for direct, the upstream URL, its relay) for a mode, with a fresh cache."""
    if mode == "direct":
        yield None, url, None
        return
    options = ["--set", "per_item_cache=false"] if mode == "whole" else []
    folder = work / mode
    folder.mkdir()
    relay = Relay(url, drop_tokens=mode == "no-tokens") if mode != "whole" else None
    try:
        with start_proxy(folder, *options) as proxy:
            yield proxy.url, relay.url if relay else url, relay
    finally:
        if relay is not None:
            relay.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=1000, help="chunks in the corpus (default: 1000)")
    parser.add_argument("--batch", type=int, default=32, help="chunks per request (default: 32)")
    parser.add_argument(
        "--changed", type=float, default=0.1, help="fraction of chunks changed (default: 0.1)"
    )
    parser.add_argument("--quick", action="store_true", help="200 chunks: a smoke run of well under a minute")
    options = parser.parse_args()
    chunks = 200 if options.quick else options.chunks
    original = corpus(chunks)
    revised, edited = changed(original, options.changed)

    results: dict[str, tuple[Pass, Pass]] = {}
    upstream_requests: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rows-") as folder:
        work = Path(folder)
        process, url = start_model_api(work, "--device", "cpu", "--model", MODEL, "--log-level", "warning")
        try:
            for mode in ("direct", "whole", "per-item", "no-tokens"):
                with through(work, mode, url) as (proxy, upstream, relay):
                    first = embed_all(url, original, options.batch, proxy, upstream)  # fills the cache
                    before = relay.requests if relay else 0
                    results[mode] = (first, embed_all(url, revised, options.batch, proxy, upstream))
                    if relay is not None:
                        upstream_requests[mode] = relay.requests - before
        finally:
            process.stop()

    batches = -(-chunks // options.batch)
    print(
        f"re-embedding {chunks} chunks ({MODEL}) in {batches} batches of {options.batch} "
        f"after changing {edited} of them ({edited / chunks:.0%})"
    )
    header = f"{'mode':<9} {'pass':<9} {'rows':>5} {'model s':>8} {'wall s':>7} {'hit':>4} {'partial':>7}"
    print(header)
    for mode, passes in results.items():
        for name, result in zip(("first", "re-embed"), passes, strict=True):
            print(
                f"{mode:<9} {name:<9} {result.rows:>5} {result.model_seconds:>8.2f} {result.wall_seconds:>7.2f} "
                f"{result.hits:>4} {result.partial:>7}"
            )
    direct = results["direct"][1]
    # The machine's speed drifts while others share it: each cache is also compared with its own first
    # pass, which computed every row just before.
    print("re-embedding relative to direct re-embedding | to the same mode's first pass:")
    for mode in ("whole", "per-item", "no-tokens"):
        first, again = results[mode]
        print(
            f"  {mode:<9} rows {again.rows / direct.rows:6.3f}   model time {again.model_seconds / direct.model_seconds:6.3f}"
            f"   wall time {again.wall_seconds / direct.wall_seconds:6.3f}"
            f"  |  model time {again.model_seconds / first.model_seconds:6.3f}"
            f"   wall time {again.wall_seconds / first.wall_seconds:6.3f}"
        )
    deviation = max(
        abs(a - b)
        for mine, theirs in zip(results["per-item"][1].vectors, direct.vectors, strict=True)
        for a, b in zip(mine, theirs, strict=True)
    )
    print(f"per-item answers vs direct: largest difference of a vector component {deviation:.2e}")
    for mode, count in upstream_requests.items():
        print(
            f"  {mode:<9} re-embedding: {count} upstream requests for {batches} batches "
            f"({count / batches:.2f} per batch), {results[mode][1].rows} rows re-computed"
        )
    if "per-item" in upstream_requests and "no-tokens" in upstream_requests:
        own, other = results["per-item"][1], results["no-tokens"][1]
        print(
            f"without X-Input-Tokens vs with: upstream requests {upstream_requests['no-tokens']} vs "
            f"{upstream_requests['per-item']}, rows re-computed {other.rows} vs {own.rows}"
        )
    wrong = (
        deviation > 1e-5 or results["per-item"][1].rows != edited or results["no-tokens"][1].rows != edited
    )
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
