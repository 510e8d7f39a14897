"""Counters: key encoding, snapshots by route, buffering, and surviving a failing store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forward_proxy.stats.counters import (
    COUNT_NAMES,
    GENERATION_NAMES,
    ROW_NAMES,
    SECONDS_NAMES,
    Counters,
    counter_key,
    parse_counter_key,
)
from forward_proxy.store.base import StoreError
from forward_proxy.store.disk import DiskCounterStore
from forward_proxy.store.memory import MemoryCounterStore

ORIGIN = "http://127.0.0.1:8000"
ROUTE = "POST /v1/embeddings"


@given(
    st.sampled_from(COUNT_NAMES + SECONDS_NAMES + ROW_NAMES + GENERATION_NAMES),
    st.text(),
    st.text(),
    st.one_of(st.none(), st.text(min_size=1)),
)
def test_counter_keys_round_trip(name: str, origin: str, route: str, model: str | None) -> None:
    assert parse_counter_key(counter_key(name, origin, route, model)) == (name, origin, route, model)


def test_snapshot_groups_by_route_and_converts_seconds() -> None:
    counters = Counters(MemoryCounterStore())
    counters.count("requests", origin=ORIGIN, route=ROUTE, model="m")
    counters.count("hits", origin=ORIGIN, route=ROUTE, model="m")
    counters.count("upstream_seconds_saved", origin=ORIGIN, route=ROUTE, model="m", amount=0.25)
    counters.count("requests", origin=ORIGIN, route="POST /v2/models/*/infer", model=None)
    snapshot = counters.snapshot()
    assert [(r.route, r.model) for r in snapshot.routes] == [(ROUTE, "m"), ("POST /v2/models/*/infer", None)]
    first = snapshot.routes[0].counts
    assert first["hits"] == 1 and first["misses"] == 0
    assert first["upstream_seconds_saved"] == pytest.approx(0.25)
    every_name = set(COUNT_NAMES) | set(SECONDS_NAMES) | set(ROW_NAMES) | set(GENERATION_NAMES)
    assert set(first) == every_name  # every name, 0 if unseen
    assert snapshot.total("requests") == 2


def test_unknown_counter_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown counter"):
        Counters(MemoryCounterStore()).count("hitz", origin=ORIGIN, route=ROUTE, model=None)


def test_buffered_counts_reach_the_store_on_flush_and_close(tmp_path: Path) -> None:
    store = DiskCounterStore(tmp_path / "counters")
    counters = Counters(store, flush_interval=3600)
    counters.count("hits", origin=ORIGIN, route=ROUTE, model=None, amount=3)
    assert store.read_all() == {}
    assert counters.snapshot().total("hits") == 3  # this process sees its own pending counts
    counters.close()
    assert store.read_all() == {counter_key("hits", ORIGIN, ROUTE, None): 3}


def test_background_flush_writes_within_the_interval(tmp_path: Path) -> None:
    store = DiskCounterStore(tmp_path / "counters")
    counters = Counters(store, flush_interval=0.05)
    try:
        counters.count("misses", origin=ORIGIN, route=ROUTE, model=None)
        reader = Counters(DiskCounterStore(tmp_path / "counters"))
        for _ in range(200):
            if reader.snapshot().total("misses") == 1:
                break
            time.sleep(0.02)
        assert reader.snapshot().total("misses") == 1
    finally:
        counters.close()


class FailingCounterStore(MemoryCounterStore):
    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    def incr_many(self, amounts: dict[str, int]) -> None:
        if self.failing:
            raise StoreError("read-only disk")
        super().incr_many(amounts)

    def read_all(self) -> dict[str, int]:
        if self.failing:
            raise StoreError("read-only disk")
        return super().read_all()


def test_counts_stay_in_memory_while_the_store_fails_and_are_written_later() -> None:
    store = FailingCounterStore()
    counters = Counters(store)
    counters.count("store_errors", origin=ORIGIN, route=ROUTE, model=None)
    counters.count("store_errors", origin=ORIGIN, route=ROUTE, model=None)
    assert counters.snapshot().total("store_errors") == 2
    store.failing = False
    counters.flush()
    assert store.read_all() == {counter_key("store_errors", ORIGIN, ROUTE, None): 2}
    assert counters.snapshot().total("store_errors") == 2
