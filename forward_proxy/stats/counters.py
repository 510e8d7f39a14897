"""The cache's counters, shared by every proxy process on a cache and kept across restarts.

Each count is one integer in the `CounterStore` under the key

    <name>|<origin>|<route>|<model>

for example `hits|http://127.0.0.1:8000|POST /v1/embeddings|all-MiniLM-L6-v2`; `model` is empty when the
request names none, and `%` and `|` inside a part are written `%25` and `%7C`. `SECONDS_NAMES` are stored
as integer microseconds and read back as seconds.

Semantics: every flow that a cache rule matched counts one `requests` and exactly one of `hits`,
`misses`, `bypasses`, `refreshes`, `coalesced`, `stale` or `partials` (so those add up to `requests`;
the report adds `partials` to its `misses`). `stores`,
`store_errors`, `upstream_errors` and `evictions` are events counted as they happen (evictions carry an
empty origin and route: they are not attributable). `bytes_served_from_cache` and
`upstream_seconds_saved` are added for answers served from the store (HIT and STALE);
`upstream_seconds` is the time spent upstream by the calls the proxy made.

`count()` only adds to memory; a background thread writes the sums every `flush_interval` seconds in one
atomic step (`flush()` and `close()` write at once), so counting costs the request path nothing and the
store lags by at most `flush_interval`. When the store fails, the sums stay in memory and are retried.

>>> from forward_proxy.store.memory import MemoryCounterStore
>>> counters = Counters(MemoryCounterStore())
>>> counters.count("hits", origin="http://m:8000", route="POST /v1/embeddings", model=None)
>>> counters.snapshot().total("hits")
1
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from forward_proxy.store.base import CounterStore, StoreError

logger = logging.getLogger(__name__)

COUNT_NAMES = (
    "requests",
    "hits",
    "misses",
    "bypasses",
    "refreshes",
    "coalesced",
    "stale",
    "stores",
    "store_errors",
    "evictions",
    "upstream_errors",
    "bytes_served_from_cache",
)
SECONDS_NAMES = ("upstream_seconds_saved", "upstream_seconds")
DECISION_NAMES = ("hits", "misses", "bypasses", "refreshes", "coalesced", "stale")
# Per-item caching of batches: a PARTIAL answer counts one request and one `partials` (the report adds
# them to its `misses`: they went upstream too); `rows`, `rows_from_cache` and `rows_upstream` count the rows of batches answered row by row
# (in `RouteCounts.counts` once counted).
ROW_NAMES = ("partials", "rows", "rows_from_cache", "rows_upstream")
_MICROSECONDS = 1_000_000
_KNOWN = frozenset(COUNT_NAMES) | frozenset(SECONDS_NAMES) | frozenset(ROW_NAMES)


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("|", "%7C")


def _unescape(part: str) -> str:
    return part.replace("%7C", "|").replace("%25", "%")


def counter_key(name: str, origin: str, route: str, model: str | None) -> str:
    return "|".join((name, _escape(origin), _escape(route), _escape(model or "")))


def parse_counter_key(key: str) -> tuple[str, str, str, str | None] | None:
    """(name, origin, route, model) of a counter key, None for a key that is not a counter."""
    parts = key.split("|")
    if len(parts) != 4 or parts[0] not in _KNOWN:
        return None
    name, origin, route, model = (_unescape(part) for part in parts)
    return name, origin, route, model or None


@dataclass
class RouteCounts:
    origin: str
    route: str
    model: str | None
    counts: dict[str, float]  # every name of COUNT_NAMES, SECONDS_NAMES and ROW_NAMES, 0 when never counted


@dataclass
class Snapshot:
    started_at: float
    routes: list[RouteCounts] = field(default_factory=list)

    def total(self, name: str) -> float:
        return sum(route.counts.get(name, 0) for route in self.routes)


class Counters:
    def __init__(self, store: CounterStore, *, flush_interval: float | None = None) -> None:
        """`flush_interval` None writes every count through at once (commands, tests); a number buffers."""
        self.store = store
        self._pending: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._flush_interval = flush_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        if flush_interval is not None:
            self._thread = threading.Thread(target=self._flush_forever, name="counters-flush", daemon=True)
            self._thread.start()

    def count(self, name: str, *, origin: str, route: str, model: str | None, amount: float = 1) -> None:
        if name not in _KNOWN:
            raise ValueError(f"unknown counter {name!r}; the names are COUNT_NAMES and SECONDS_NAMES")
        value = round(amount * _MICROSECONDS) if name in SECONDS_NAMES else int(amount)
        if not value:
            return
        key = counter_key(name, origin, route, model)
        with self._lock:
            self._pending[key] += value
        if self._flush_interval is None:
            self.flush()

    def flush(self) -> None:
        """Write the counts made so far to the store (kept for a later try when the store fails)."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(int)
        if not pending:
            return
        try:
            self.store.incr_many(dict(pending))
        except StoreError as exc:
            with self._lock:
                for key, value in pending.items():
                    self._pending[key] += value
            if not self._failing:
                logger.warning(f"counters kept in memory: the counter store failed ({exc})")
            self._failing = True
        else:
            if self._failing:
                logger.info("counters written to the counter store again")
            self._failing = False

    def snapshot(self) -> Snapshot:
        """The store's counts plus this process's unwritten ones (memory only when the store fails)."""
        try:
            stored = self.store.read_all()
            started_at = self.store.started_at()
        except StoreError:
            stored, started_at = {}, 0.0
        with self._lock:
            combined = dict(stored)
            for key, value in self._pending.items():
                combined[key] = combined.get(key, 0) + value
        routes: dict[tuple[str, str, str | None], RouteCounts] = {}
        for key, value in combined.items():
            parsed = parse_counter_key(key)
            if parsed is None:
                continue
            name, origin, route, model = parsed
            group = routes.get((origin, route, model))
            if group is None:
                counts: dict[str, float] = {
                    **dict.fromkeys(COUNT_NAMES, 0),
                    **dict.fromkeys(SECONDS_NAMES, 0.0),
                    **dict.fromkeys(ROW_NAMES, 0),
                }
                group = routes[(origin, route, model)] = RouteCounts(origin, route, model, counts)
            group.counts[name] = group.counts.get(name, 0) + (
                value / _MICROSECONDS if name in SECONDS_NAMES else value
            )
        ordered = sorted(routes.values(), key=lambda r: (r.origin, r.route, r.model or ""))
        return Snapshot(started_at, ordered)

    def close(self) -> None:
        """Stop the flushing thread and write what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def _flush_forever(self) -> None:
        assert self._flush_interval is not None
        while not self._stop.wait(self._flush_interval):
            try:
                self.flush()
            except Exception:  # the thread must outlive any surprise; the next round retries
                logger.exception("counter flush failed")
