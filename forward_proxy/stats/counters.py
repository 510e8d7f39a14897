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
`upstream_seconds` is the time spent upstream by the calls the proxy made. `completion_tokens_saved`
(`GENERATION_NAMES`) adds, for every completion answered without generating it again (HIT, STALE,
COALESCED), the completion tokens its stored `usage` reports.

Bounded labels (`LabelBounds`): the model comes from request bodies and the origin from any host:port a
client names, so neither may grow the store or `/metrics` without limit. A label value longer than
`max_length` is cut (ending in `~`); past `max_origins` origins, `max_routes` routes per origin and
`max_models` models per route, new values are counted under `other` (`OTHER`). The values already in
the store count towards those limits, so the bounds hold across restarts, and `snapshot()` folds a store
written without them the same way. With `hold_unanswered` (the proxy's default), an origin is only
written once an upstream answered there (a count in `ANSWER_NAMES`, or `answered(origin)`): until then its counts wait in memory (for at most
`max_pending_origins` origins, the oldest dropped), so requests to closed or refused ports leave no trace.
The process's bounds are set by the statistics options (`set_label_bounds`, from `stats/admin.py`).

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
import weakref
from collections import OrderedDict, defaultdict
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
# Completions answered from the cache: the tokens the model did not generate again, as its stored `usage`
# says (the generation time saved is `upstream_seconds_saved` on the completion routes, per model).
GENERATION_NAMES = ("completion_tokens_saved",)
_MICROSECONDS = 1_000_000
_KNOWN = (
    frozenset(COUNT_NAMES) | frozenset(SECONDS_NAMES) | frozenset(ROW_NAMES) | frozenset(GENERATION_NAMES)
)


# Counts that prove an upstream answered at that origin (now, or when the entry served was stored).
ANSWER_NAMES = frozenset(
    {"upstream_seconds", "stores", "hits", "stale", "bytes_served_from_cache", "upstream_seconds_saved"}
)
OTHER = "other"
_MOST_ANSWERED = 4096


@dataclass(frozen=True)
class LabelBounds:
    """How many distinct label values the counters keep, and how long each may be."""

    max_length: int = 100
    max_origins: int = 50
    max_routes: int = 50  # per origin
    max_models: int = 20  # per origin and route
    max_pending_origins: int = 64  # origins waiting for their first upstream answer
    # Hold an origin's counts until an upstream answered there. Off in a bare `Counters` (commands and
    # tests count what they are given); the proxy turns it on through its statistics options.
    hold_unanswered: bool = False

    def cut(self, value: str) -> str:
        """`value`, or its first `max_length` - 1 characters and `~` when it is longer.

        >>> LabelBounds(max_length=8).cut("all-MiniLM-L6-v2")
        'all-Min~'
        """
        return value if len(value) <= self.max_length else value[: self.max_length - 1] + "~"


_bounds = LabelBounds()


def set_label_bounds(bounds: LabelBounds) -> None:
    """The bounds every `Counters` of this process applies from now on (the statistics options)."""
    global _bounds
    _bounds = bounds


def label_bounds() -> LabelBounds:
    return _bounds


_live: weakref.WeakSet[Counters] = weakref.WeakSet()


def origin_answered(origin: str) -> None:
    """An upstream answered at `origin` (a response mitmproxy forwarded): tell every `Counters` of this
    process, so the counts they hold for it are written."""
    for counters in list(_live):
        counters.answered(origin)


class _Labels:
    """The label values admitted so far, by origin and route; decides which new ones are `other`."""

    def __init__(self) -> None:
        self.tree: dict[str, dict[str, set[str]]] = {}

    def learn(self, origin: str, route: str, model: str) -> None:
        self.tree.setdefault(origin, {}).setdefault(route, set()).add(model)

    def admit(self, bounds: LabelBounds, origin: str, route: str, model: str) -> tuple[str, str, str]:
        origin, route, model = bounds.cut(origin), bounds.cut(route), bounds.cut(model)
        if origin and origin not in self.tree and len(self.tree) >= bounds.max_origins:
            origin = OTHER
        routes = self.tree.setdefault(origin, {})
        if route and route not in routes and len(routes) >= bounds.max_routes:
            route = OTHER
        models = routes.setdefault(route, set())
        if model and model not in models and len(models - {""}) >= bounds.max_models:
            model = OTHER
        models.add(model)
        return origin, route, model


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
    counts: dict[str, float]  # every name of the four *_NAMES above, 0 when never counted


@dataclass
class Snapshot:
    started_at: float
    routes: list[RouteCounts] = field(default_factory=list)

    def total(self, name: str) -> float:
        return sum(route.counts.get(name, 0) for route in self.routes)


class Counters:
    def __init__(
        self, store: CounterStore, *, flush_interval: float | None = None, bounds: LabelBounds | None = None
    ) -> None:
        """`flush_interval` None writes every count through at once (commands, tests); a number buffers.
        `bounds` None: the process's (`set_label_bounds`)."""
        self.store = store
        self._bounds = bounds
        self._pending: defaultdict[str, int] = defaultdict(int)
        self._labels: _Labels | None = None  # learnt from the store on the first count
        _live.add(self)
        self._answered: set[str] = set()  # origins an upstream answered at, seen by this process
        self._held: OrderedDict[str, defaultdict[tuple[str, str, str, str], int]] = OrderedDict()
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
            raise ValueError(f"unknown counter {name!r}; the names are the *_NAMES of stats/counters.py")
        value = round(amount * _MICROSECONDS) if name in SECONDS_NAMES else int(amount)
        if not value:
            return
        labels = self._known_labels()
        with self._lock:
            if name in ANSWER_NAMES:
                self._remember_answered(origin)
            elif origin and self.bounds.hold_unanswered and not self._has_answered(labels, origin):
                self._hold(name, origin, route, model or "", value)
                return
            held = self._held.pop(origin, None)
            for (held_name, _, held_route, held_model), held_value in (held or {}).items():
                self._add(labels, held_name, origin, held_route, held_model, held_value)
            self._add(labels, name, origin, route, model or "", value)
        if self._flush_interval is None:
            self.flush()

    def answered(self, origin: str) -> None:
        """An upstream answered at `origin`: its counts (held until now) are written from now on."""
        if not self.bounds.hold_unanswered or (origin not in self._held and origin in self._answered):
            return  # the usual case, on every forwarded response: nothing to do, no lock taken
        labels = self._known_labels()
        with self._lock:
            self._remember_answered(origin)
            held = self._held.pop(origin, None)
            for (name, _, route, model), value in (held or {}).items():
                self._add(labels, name, origin, route, model, value)
        if self._flush_interval is None:
            self.flush()

    @property
    def bounds(self) -> LabelBounds:
        return self._bounds if self._bounds is not None else _bounds

    def _add(self, labels: _Labels, name: str, origin: str, route: str, model: str, value: int) -> None:
        origin, route, model = labels.admit(self.bounds, origin, route, model)
        self._pending[counter_key(name, origin, route, model)] += value

    def _has_answered(self, labels: _Labels, origin: str) -> bool:
        cut = self.bounds.cut(origin)
        return cut in self._answered or (cut in labels.tree and cut != OTHER)

    def _remember_answered(self, origin: str) -> None:
        if len(self._answered) < _MOST_ANSWERED:  # beyond, the store's labels still tell most of them
            self._answered.add(self.bounds.cut(origin))

    def _hold(self, name: str, origin: str, route: str, model: str, value: int) -> None:
        held = self._held.get(origin)
        if held is None:
            if len(self._held) >= self.bounds.max_pending_origins:
                self._held.popitem(last=False)  # the oldest origin that never answered is forgotten
            held = self._held[origin] = defaultdict(int)
        bounds = self.bounds
        key = (name, origin, bounds.cut(route), bounds.cut(model))
        if key in held or len(held) < 4 * len(_KNOWN):  # a bounded number of label sets per origin
            held[key] += value

    def _known_labels(self) -> _Labels:
        """The labels in the store (read once), so that the bounds hold across restarts."""
        if self._labels is None:
            labels = _Labels()
            try:
                stored = self.store.read_all()
            except StoreError:
                stored = {}
            for key in stored:
                parsed = parse_counter_key(key)
                if parsed is not None:
                    labels.learn(parsed[1], parsed[2], parsed[3] or "")
            with self._lock:
                if self._labels is None:
                    self._labels = labels
        return self._labels

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
        folded = _Labels()  # a store written without bounds (or with wider ones) is shown within them
        for key, value in sorted(combined.items()):
            parsed = parse_counter_key(key)
            if parsed is None:
                continue
            name, origin, route, model_label = parsed
            origin, route, model_label = folded.admit(self.bounds, origin, route, model_label or "")
            model = model_label or None
            group = routes.get((origin, route, model))
            if group is None:
                counts: dict[str, float] = {
                    **dict.fromkeys(COUNT_NAMES, 0),
                    **dict.fromkeys(SECONDS_NAMES, 0.0),
                    **dict.fromkeys(ROW_NAMES, 0),
                    **dict.fromkeys(GENERATION_NAMES, 0),
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
