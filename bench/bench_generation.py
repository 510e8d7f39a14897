"""The chat model: tokens/s at concurrency 1 and 4, and what a cold answer, a hit and a shared stream cost.

Starts the real model server with its chat model (SmolLM2-135M-Instruct, from `.venv-model`) on a free
loopback port and

1. **throughput**: for each concurrency (1 and 4 by default), that many clients each send streamed,
   greedy chat requests with questions no other request asks, back to back, for a fixed time. Prints
   generated tokens/s over the whole run, time to first token (p50) and time to a whole answer (p50),
   and the largest batch the engine decoded together (`/stats`): the gain of decoding concurrent
   requests together is the tokens/s ratio 4 : 1;
2. **one answer: cold, a hit, a shared stream**: one fixed question, streamed and greedy, so every answer
   is the same `--max-tokens` tokens: straight to the model, then through `forward-proxy run` (started
   here on its own cache directory) cold, then again (a hit from the store). Then the entry is purged
   and the question asked once more, and as soon as its first token arrived, `--shared` identical
   requests join it while it is still generating. For each answer: time to first token and time to the
   whole answer, both from when that request was sent, and the proxy's `X-Cache`; whatever the proxy does
   with the requests, it is measured as it is. Last, the generations the model ran for the shared answer
   and the tokens and generation time saved that `forward-proxy stats` counted.

    .venv/bin/python bench/bench_generation.py [--duration 20] [--concurrency 1 4] [--max-tokens 48] [--shared 4]

Needs `requests` and, for part 2, the proxy's environment (`.venv`); about a minute and a half with the
defaults on 2 cores (most of it the model's load and the fixed-time runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client_app.chat import sse_payloads  # noqa: E402
from tests.support.model_server import start_model_api  # noqa: E402

CHAT_MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What does a forward proxy do?"  # part 2: the same question, so every answer is the same
TOPICS = ["a forward proxy", "a cache", "an embedding", "a GPU", "a load balancer", "TLS", "DNS", "a queue"]


@dataclass(frozen=True)
class Answer:
    first_token_s: float
    total_s: float
    tokens: int
    chunks: int
    x_cache: str
    text: str


def ask(
    session: requests.Session,
    url: str,
    question: str,
    max_tokens: int,
    on_first_token: Callable[[], None] = lambda: None,
) -> Answer:
    """One streamed greedy chat request, timed from sending to its first content and to [DONE]."""
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    text, chunks, tokens = "", 0, 0
    with session.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        for data in sse_payloads(response.iter_content(chunk_size=None)):
            if data == "[DONE]":
                break
            chunk: dict[str, Any] = json.loads(data)
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    if first is None:
                        first = time.perf_counter() - started
                        on_first_token()
                    text += choice["delta"]["content"]
                    chunks += 1
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
        x_cache = response.headers.get("X-Cache", "-")
    total = time.perf_counter() - started
    return Answer(first if first is not None else total, total, tokens, chunks, x_cache, text)


def direct_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def throughput(url: str, concurrency: int, duration: float, max_tokens: int) -> dict[str, Any]:
    answers: list[Answer] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def client(number: int) -> None:
        with direct_session() as session:
            asked = 0
            while time.monotonic() < deadline:
                topic = TOPICS[(number + asked) % len(TOPICS)]
                question = (
                    f"In two sentences, what is {topic}? (request {number}-{asked}-{uuid.uuid4().hex[:6]})"
                )
                answer = ask(session, url, question, max_tokens)
                asked += 1
                with lock:
                    answers.append(answer)

    before = direct_session().get(f"{url}/stats", timeout=10).json()["chat_models"][CHAT_MODEL]
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    after = direct_session().get(f"{url}/stats", timeout=10).json()["chat_models"][CHAT_MODEL]
    tokens = sum(answer.tokens for answer in answers)
    return {
        "concurrency": concurrency,
        "answers": len(answers),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "first_token_p50_s": statistics.median(answer.first_token_s for answer in answers),
        "answer_p50_s": statistics.median(answer.total_s for answer in answers),
        "largest_batch": after["largest_batch"],
        "passes": after["decode_steps"] - before["decode_steps"],
    }


def print_answer(label: str, answer: Answer) -> None:
    print(
        f"  {label:<28} first token {answer.first_token_s * 1000:8.1f} ms   whole answer "
        f"{answer.total_s * 1000:8.1f} ms   {answer.tokens:3d} tokens in {answer.chunks:3d} chunks   "
        f"X-Cache: {answer.x_cache}"
    )


def model_generations(url: str) -> int:
    """Chat requests the model has run so far (each generation counts one)."""
    return int(direct_session().get(f"{url}/stats", timeout=10).json()["chat_models"][CHAT_MODEL]["requests"])


def one_answer(url: str, work: Path, max_tokens: int, shared: int) -> None:
    try:
        from tests.support.proxy import proxy_command, start_proxy
    except ImportError as error:  # pragma: no cover - the model environment has no mitmproxy
        print(f"  (no proxy part: {error}; run this benchmark with .venv/bin/python)")
        return
    with direct_session() as session:
        print_answer("straight to the model", ask(session, url, QUESTION, max_tokens))
    proxy = start_proxy(work, "--set", f"confdir={work / 'proxy-conf'}")

    def forward_proxy(*args: str) -> str:  # `forward-proxy stats` or `cache` on this proxy's cache
        command = [proxy_command(), *args, "--cache-dir", str(proxy.cache_dir)]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout

    try:
        with proxy.session() as session:
            cold = ask(session, url, QUESTION, max_tokens)
            print_answer("through the proxy, cold", cold)
            time.sleep(0.5)  # the answer written to the store: the hit a later client gets
            hit = ask(session, url, QUESTION, max_tokens)
            print_answer("through the proxy, hit", hit)
            if hit.text != cold.text:
                print("  (the hit's text differs from the cold answer's)")
        forward_proxy("cache", "purge", "--all")  # the same question cold again, for the shared stream
        generations_before = model_generations(url)
        first_token = threading.Event()
        answers: dict[str, Answer] = {}

        def one(name: str, on_first_token: Callable[[], None] = lambda: None) -> None:
            with proxy.session() as session:
                answers[name] = ask(session, url, QUESTION, max_tokens, on_first_token)

        leader = threading.Thread(target=one, args=("first", first_token.set))
        leader.start()
        first_token.wait(timeout=120)
        threads = [threading.Thread(target=one, args=(f"joining #{n + 1}",)) for n in range(shared)]
        for thread in threads:
            thread.start()
        for thread in [leader, *threads]:
            thread.join()
        print_answer("first of the shared stream", answers["first"])
        for number in range(shared):
            print_answer(f"joining it #{number + 1}", answers[f"joining #{number + 1}"])
        print(
            f"  the {shared} joined at the first one's first token, "
            f"{answers['first'].first_token_s * 1000:.0f} ms after it was sent; the model generated "
            f"{model_generations(url) - generations_before} answer(s) for the {shared + 1} requests"
        )
    finally:
        proxy.stop()  # which writes its last counts
    report = json.loads(forward_proxy("stats", "--json"))
    for row in report["routes"]:
        if row["model"] == CHAT_MODEL:
            print(
                f"  forward-proxy stats, {CHAT_MODEL}: {row['hits']} hit(s), {row['coalesced']} coalesced, "
                f"{row['completion_tokens_saved']} completion tokens and {row['upstream_seconds_saved']:.2f} s "
                "of generation saved"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency (default: 20)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="levels (default: 1 4)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer at most (default: 48)")
    parser.add_argument(
        "--shared", type=int, default=4, help="identical requests joining a generation (default: 4)"
    )
    parser.add_argument("--device", default="cpu", help="--device of the model server (default: cpu)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as folder:
        work = Path(folder)
        loading = time.perf_counter()
        process, url = start_model_api(
            work, "--device", arguments.device, "--log-level", "warning", chat=True
        )
        try:
            print(f"model server with {CHAT_MODEL} ready in {time.perf_counter() - loading:.1f} s ({url})")
            with direct_session() as session:  # the first answer pays for allocations
                ask(session, url, "Hello!", 8)
            print(
                f"\n1. throughput: streamed greedy answers of at most {arguments.max_tokens} tokens, {arguments.duration:g} s each"
            )
            print("   concurrency  answers  tokens  tokens/s  first token p50  answer p50  largest batch")
            rows = []
            for concurrency in arguments.concurrency:
                row = throughput(url, concurrency, arguments.duration, arguments.max_tokens)
                rows.append(row)
                print(
                    f"   {row['concurrency']:>11}  {row['answers']:>7}  {row['tokens']:>6}  {row['tokens_per_s']:>8.1f}"
                    f"  {row['first_token_p50_s'] * 1000:>12.0f} ms  {row['answer_p50_s']:>8.2f} s  {row['largest_batch']:>13}"
                )
            if len(rows) > 1:
                print(
                    f"   tokens/s at {rows[-1]['concurrency']} vs {rows[0]['concurrency']}: {rows[-1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x"
                )
            print(
                f"\n2. one answer of at most {arguments.max_tokens} tokens: cold, a hit, and {arguments.shared} "
                "joining it while it is generated"
            )
            one_answer(url, work, arguments.max_tokens, arguments.shared)
        finally:
            process.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
