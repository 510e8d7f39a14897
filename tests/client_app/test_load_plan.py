"""Pure pieces of `client_app.load`: the request plan, percentiles, the threaded runner, the report."""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client_app.client import ClientError, Reply
from client_app.load import Outcome, embedding_texts, percentile, plan_requests, run, summarise, tensor_rows


@given(st.integers(0, 300), st.floats(0, 1), st.integers())
def test_plan_has_exactly_the_asked_share_of_repeats(count: int, ratio: float, seed: int) -> None:
    plan = plan_requests(count, ratio, random.Random(seed))
    assert len(plan) == count
    repeats = count - len(set(plan))
    assert repeats == min(round(ratio * count), max(count - 1, 0))
    fresh_so_far = 0
    for payload in plan:  # new ids count up; a repeat only names an id sent before it
        if payload == fresh_so_far:
            fresh_so_far += 1
        else:
            assert payload < fresh_so_far


def test_plan_examples() -> None:
    assert plan_requests(5, 0.0, random.Random(1)) == [0, 1, 2, 3, 4]
    assert plan_requests(4, 1.0, random.Random(1)) == [0, 0, 0, 0]
    assert plan_requests(0, 0.5, random.Random(1)) == []
    with pytest.raises(ValueError):
        plan_requests(3, 1.5, random.Random(1))


def test_payloads_are_deterministic_and_distinct() -> None:
    assert embedding_texts("s", 3, 2) == embedding_texts("s", 3, 2)
    assert (
        len(set(embedding_texts("s", 3, 4) + embedding_texts("s", 4, 4) + embedding_texts("t", 3, 4))) == 12
    )
    rows = tensor_rows("s", 1, 3, 64)
    assert rows == tensor_rows("s", 1, 3, 64) != tensor_rows("s", 2, 3, 64)
    assert len(rows) == 3 and all(len(r) == 64 and all(0 <= v <= 16 for v in r) for r in rows)


def test_percentile_interpolates_like_numpy() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 0) == 15.0
    assert percentile(values, 50) == 35.0
    assert percentile(values, 90) == pytest.approx(46.0)
    assert percentile(values, 100) == 50.0
    assert percentile([7.0], 99) == 7.0
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)


def reply(x_cache: str | None) -> Reply:
    headers = {"X-Cache": x_cache} if x_cache else {}
    return Reply("POST", "http://t/", 200, headers, {}, 0.0, None)


def test_run_sends_every_planned_request_once_with_bounded_concurrency() -> None:
    in_flight, peak = 0, 0
    lock = threading.Lock()
    sent: list[int] = []

    def send(payload: int) -> Reply:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
            sent.append(payload)
        time.sleep(0.005)
        with lock:
            in_flight -= 1
        return reply("HIT" if payload % 2 else "MISS")

    plan = list(range(40))
    outcomes, elapsed = run(send, plan, concurrency=4)
    assert sorted(sent) == plan and len(outcomes) == 40
    assert 1 < peak <= 4
    assert elapsed > 0


def test_run_records_failures_and_reraises_bugs() -> None:
    def flaky(payload: int) -> Reply:
        if payload == 2:
            raise ClientError("boom", status=503)
        return reply(None)

    outcomes, _ = run(flaky, [0, 1, 2, 3], concurrency=2)
    failed = [o for o in outcomes if o.error]
    assert [(o.payload, o.error, o.status) for o in failed] == [(2, "boom", 503)]

    def buggy(payload: int) -> Reply:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run(buggy, [0, 1, 2], concurrency=2)


def test_run_stops_starting_requests_after_the_duration() -> None:
    def slow(payload: int) -> Reply:
        time.sleep(0.05)
        return reply(None)

    outcomes, elapsed = run(slow, list(range(1000)), concurrency=2, duration=0.3)
    assert 2 <= len(outcomes) <= 20
    assert elapsed < 2


def test_summary_counts() -> None:
    outcomes = [
        Outcome(0, 0.010, "MISS"),
        Outcome(1, 0.020, "MISS"),
        Outcome(0, 0.001, "HIT"),
        Outcome(2, 0.030, None),
        Outcome(3, 0.5, None, "refused", None),
    ]
    report = summarise(outcomes, 2.0, planned=[0, 1, 0, 2, 3, 4], batch=4, settings={"route": "embeddings"})
    assert report["route"] == "embeddings"
    assert (report["planned"], report["planned_repeats"], report["sent"], report["ok"], report["failed"]) == (
        6,
        1,
        5,
        4,
        1,
    )
    assert report["stopped_early"] is True
    assert report["throughput_rps"] == 2.0 and report["rows_per_s"] == 8.0
    assert report["x_cache"] == {"MISS": 2, "HIT": 1, "none": 1}
    assert report["errors"] == [{"message": "refused", "count": 1}]
    assert report["latency_ms"]["p50"] == 15.0 and report["latency_ms"]["max"] == 30.0
    assert report["latency_ms_by_cache"] == {
        "MISS": {"p50": 15.0, "p90": 19.0},
        "HIT": {"p50": 1.0, "p90": 1.0},
        "none": {"p50": 30.0, "p90": 30.0},
    }
