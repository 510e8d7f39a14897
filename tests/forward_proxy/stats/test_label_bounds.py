"""The counters' label bounds: cut values, `other` past the limits, across restarts, origins that never
answered. Real `Counters` over an in-memory store; no sockets."""

from __future__ import annotations

from forward_proxy.stats.counters import OTHER, Counters, LabelBounds
from forward_proxy.store.memory import MemoryCounterStore

ORIGIN = "http://127.0.0.1:8000"
ROUTE = "POST /v1/embeddings"
SMALL = LabelBounds(max_length=20, max_origins=2, max_routes=2, max_models=3)


def _models(counters: Counters) -> dict[str | None, float]:
    return {route.model: route.counts["requests"] for route in counters.snapshot().routes}


def test_models_past_the_limit_are_counted_as_other() -> None:
    counters = Counters(MemoryCounterStore(), bounds=SMALL)
    for serial in range(10):
        counters.count("requests", origin=ORIGIN, route=ROUTE, model=f"m{serial}")
    assert _models(counters) == {"m0": 1, "m1": 1, "m2": 1, OTHER: 7}


def test_long_labels_are_cut() -> None:
    counters = Counters(MemoryCounterStore(), bounds=SMALL)
    counters.count("requests", origin=ORIGIN, route=ROUTE, model="x" * 10_000)
    [route] = counters.snapshot().routes
    assert route.model == "x" * 19 + "~" and len(route.origin) <= 20


def test_origins_and_routes_past_the_limit_are_other() -> None:
    counters = Counters(MemoryCounterStore(), bounds=SMALL)
    for port in range(5):
        for route in ("POST /a", "POST /b", "POST /c"):
            counters.count("requests", origin=f"http://h:{port}", route=route, model=None)
    origins = {route.origin for route in counters.snapshot().routes}
    assert origins == {"http://h:0", "http://h:1", OTHER}
    assert {r.route for r in counters.snapshot().routes if r.origin == "http://h:0"} == {
        "POST /a",
        "POST /b",
        OTHER,
    }
    assert counters.snapshot().total("requests") == 15  # nothing is lost, only grouped


def test_the_bounds_hold_across_restarts() -> None:
    store = MemoryCounterStore()
    first = Counters(store, bounds=SMALL)
    for serial in range(3):
        first.count("requests", origin=ORIGIN, route=ROUTE, model=f"m{serial}")
    second = Counters(store, bounds=SMALL)  # a restarted proxy on the same store
    second.count("requests", origin=ORIGIN, route=ROUTE, model="new")
    second.count("requests", origin=ORIGIN, route=ROUTE, model="m1")
    assert _models(second) == {"m0": 1, "m1": 2, "m2": 1, OTHER: 1}


def test_a_store_written_without_bounds_is_shown_within_them() -> None:
    store = MemoryCounterStore()
    unbounded = Counters(store, bounds=LabelBounds(max_models=10_000))
    for serial in range(100):
        unbounded.count("requests", origin=ORIGIN, route=ROUTE, model=f"m{serial:03d}")
    shown = Counters(store, bounds=SMALL).snapshot()
    assert len(shown.routes) == 4 and shown.total("requests") == 100


def test_an_origin_is_counted_once_an_upstream_answered_there() -> None:
    holding = LabelBounds(hold_unanswered=True)
    counters = Counters(MemoryCounterStore(), bounds=holding)
    dead = "http://127.0.0.1:1"
    counters.count("requests", origin=dead, route=ROUTE, model=None)
    counters.count("upstream_errors", origin=dead, route=ROUTE, model=None)
    assert counters.snapshot().routes == []  # refused: not counted, not stored
    counters.count("requests", origin=ORIGIN, route=ROUTE, model=None)
    counters.count("upstream_seconds", origin=ORIGIN, route=ROUTE, model=None, amount=0.5)
    [route] = counters.snapshot().routes
    assert route.origin == ORIGIN and route.counts["requests"] == 1
    counters.answered(dead)  # an upstream answered there after all: its held counts are written
    assert counters.snapshot().total("upstream_errors") == 1


def test_held_origins_are_bounded() -> None:
    counters = Counters(MemoryCounterStore(), bounds=LabelBounds(hold_unanswered=True, max_pending_origins=3))
    for port in range(1000):
        counters.count("requests", origin=f"http://127.0.0.1:{port}", route=ROUTE, model=None)
    counters.answered("http://127.0.0.1:0")  # the oldest were forgotten: only 3 origins are kept waiting
    assert counters.snapshot().total("requests") == 0
    counters.answered("http://127.0.0.1:999")
    assert counters.snapshot().total("requests") == 1
