"""A bounded load generator: N planned requests, C worker threads, a share R of repeated requests.

The plan is made before anything is sent: exactly `round(R * N)` requests (at most N - 1: the first one
is always new) repeat the payload of an earlier request, chosen at random, so they can be answered by the
proxy's cache; the others carry payloads never sent before in this run. With concurrency above 1 a repeat
may be in flight together with its original, which a coalescing proxy answers as `COALESCED`.

The run stops when every planned request has been sent or, with a duration cap, when the cap has passed
(requests already in flight finish; none is started after the cap).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from client_app.client import ClientError, Reply

NO_HEADER = "none"  # the X-Cache mix's name for answers that carried no X-Cache header

# Words for fresh embedding inputs: varied enough that the texts read like sentences of different lengths.
WORDS = [
    "cache",
    "proxy",
    "model",
    "request",
    "answer",
    "vector",
    "sentence",
    "river",
    "mountain",
    "coffee",
    "train",
    "market",
    "garden",
    "music",
    "planet",
    "window",
    "letter",
    "winter",
    "summer",
    "harbour",
    "library",
    "engine",
    "signal",
    "bridge",
    "forest",
    "doctor",
    "island",
    "kitchen",
    "number",
    "orange",
    "silver",
    "yellow",
    "quickly",
    "slowly",
    "bright",
    "quiet",
    "ancient",
    "modern",
    "simple",
    "careful",
]


@dataclass(frozen=True)
class Outcome:
    payload: int
    seconds: float
    x_cache: str | None
    error: str | None = None
    status: int | None = None


def plan_requests(count: int, repeat_ratio: float, rng: random.Random) -> list[int]:
    """Payload ids, one per request: new ids count up from 0, a repeat reuses an earlier request's id."""
    if count < 0 or not 0.0 <= repeat_ratio <= 1.0:
        raise ValueError("count must be >= 0 and repeat_ratio within [0, 1]")
    repeats = min(round(repeat_ratio * count), max(count - 1, 0))
    repeat_positions = set(rng.sample(range(1, count), repeats)) if repeats else set()
    plan: list[int] = []
    fresh = 0
    for position in range(count):
        if position in repeat_positions:
            plan.append(rng.randrange(fresh))
        else:
            plan.append(fresh)
            fresh += 1
    return plan


def embedding_texts(seed: str, payload: int, batch: int) -> list[str]:
    """`batch` texts that belong to `payload` alone; the same (seed, payload) always gives the same texts."""
    texts = []
    for row in range(batch):
        rng = random.Random(f"{seed}/{payload}/{row}")
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        texts.append(f"load {seed} request {payload} row {row}: {words}")
    return texts


def tensor_rows(seed: str, payload: int, batch: int, row_size: int, high: int = 16) -> list[list[float]]:
    """`batch` rows of `row_size` whole numbers in [0, high] (the digits' grey levels) for `payload`."""
    rng = random.Random(f"{seed}/{payload}")
    return [[float(rng.randint(0, high)) for _ in range(row_size)] for _ in range(batch)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def run(
    send: Callable[[int], Reply],
    plan: Sequence[int],
    *,
    concurrency: int,
    duration: float | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> tuple[list[Outcome], float]:
    """Send the plan from `concurrency` threads; returns the outcomes (in completion order) and wall time.

    `send(payload)` is called from worker threads and must be safe there (one client per thread).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    next_position = 0
    failures: list[BaseException] = []
    started = time.perf_counter()
    deadline = None if duration is None else started + duration

    def take() -> int | None:
        nonlocal next_position
        with lock:
            if next_position >= len(plan) or failures:
                return None
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            next_position += 1
            return plan[next_position - 1]

    def work() -> None:
        try:
            while (payload := take()) is not None:
                begun = time.perf_counter()
                try:
                    reply = send(payload)
                    outcome = Outcome(payload, time.perf_counter() - begun, reply.x_cache)
                except ClientError as exc:
                    outcome = Outcome(payload, time.perf_counter() - begun, None, str(exc), exc.status)
                with lock:
                    outcomes.append(outcome)
                if on_done is not None:
                    on_done(outcome)
        except BaseException as exc:  # a bug, not a failed request: stop everyone and re-raise below
            with lock:
                failures.append(exc)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(min(concurrency, max(len(plan), 1)))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    return outcomes, time.perf_counter() - started


def summarise(
    outcomes: Sequence[Outcome],
    elapsed: float,
    *,
    planned: Sequence[int],
    batch: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The report `client-app load --json` prints (documented in docs/client.md)."""
    ok = [outcome for outcome in outcomes if outcome.error is None]
    failed = [outcome for outcome in outcomes if outcome.error is not None]
    latencies_ms = [outcome.seconds * 1000.0 for outcome in ok]
    mix = Counter(outcome.x_cache or NO_HEADER for outcome in ok)
    by_cache: dict[str, list[float]] = {}
    for outcome in ok:
        by_cache.setdefault(outcome.x_cache or NO_HEADER, []).append(outcome.seconds * 1000.0)
    errors = Counter(outcome.error for outcome in failed)
    repeats = len(planned) - len(set(planned))
    return {
        **settings,
        "planned": len(planned),
        "planned_repeats": repeats,
        "sent": len(outcomes),
        "ok": len(ok),
        "failed": len(failed),
        "stopped_early": len(outcomes) < len(planned),
        "elapsed_s": round(elapsed, 4),
        "throughput_rps": round(len(ok) / elapsed, 2) if elapsed > 0 else 0.0,
        "rows_per_s": round(len(ok) * batch / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": {
            name: (round(percentile(latencies_ms, q), 2) if latencies_ms else None)
            for name, q in (("p50", 50), ("p90", 90), ("p99", 99))
        }
        | {
            "mean": round(sum(latencies_ms) / len(latencies_ms), 2) if latencies_ms else None,
            "max": round(max(latencies_ms), 2) if latencies_ms else None,
        },
        "x_cache": dict(mix.most_common()),
        # What a hit costs is hidden in the mix's percentiles: each X-Cache value's own p50 and p90.
        "latency_ms_by_cache": {
            name: {
                "p50": round(percentile(by_cache[name], 50), 2),
                "p90": round(percentile(by_cache[name], 90), 2),
            }
            for name, _ in mix.most_common()
        },
        "errors": [{"message": message, "count": count} for message, count in errors.most_common()],
    }
