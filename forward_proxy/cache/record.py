"""What the cache did with one request: one typed record in `flow.metadata`, read by every reporter.

The cache addon writes a `CacheRecord` under `RECORD` for each request a cache rule matches; the counters,
Prometheus metrics, the access log and the dashboard all read that record (nothing else in
`flow.metadata` is the cache's). `Decision` is the one list of what `X-Cache` can say:

    HIT        every row came from the store
    MISS       fetched from the upstream (and stored when the answer allows it)
    PARTIAL    some rows from the store, the rest from the upstream in one request
    REFRESH    `Cache-Control: no-cache`: fetched and stored without looking up
    BYPASS     not handled by the cache (`no-store`, a streamed or unsplittable exchange): forwarded as is
    COALESCED  an identical request was already upstream; this one got that answer
    STALE      the upstream failed and an entry within the stale-if-error window stood in

>>> record = CacheRecord(route="POST /v1/embeddings", origin="http://m:8000", model="minilm")
>>> record.decision is None, Decision.PARTIAL.counter
(True, 'partials')
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

RECORD = "forward_proxy.cache"


class Decision(enum.Enum):
    HIT = "HIT"
    MISS = "MISS"
    PARTIAL = "PARTIAL"
    REFRESH = "REFRESH"
    BYPASS = "BYPASS"
    COALESCED = "COALESCED"
    STALE = "STALE"

    @property
    def counter(self) -> str:
        """The counter each decision adds one to (a PARTIAL is counted once, in `partials`)."""
        return _COUNTERS[self]

    @property
    def from_store(self) -> bool:
        return self in (Decision.HIT, Decision.STALE)


_COUNTERS = {
    Decision.HIT: "hits",
    Decision.MISS: "misses",
    Decision.PARTIAL: "partials",
    Decision.REFRESH: "refreshes",
    Decision.BYPASS: "bypasses",
    Decision.COALESCED: "coalesced",
    Decision.STALE: "stale",
}


@dataclass
class RowFigures:
    rows: int  # rows in the client's request
    from_cache: int  # served from the store
    upstream: int  # sent upstream by this request

    def as_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "from_cache": self.from_cache, "upstream": self.upstream}


@dataclass
class CacheRecord:
    """The cache's decision about one flow and the figures the reporters show."""

    route: str  # the cache rule's label, "POST /v1/embeddings"
    origin: str  # "http://127.0.0.1:8000"
    model: str | None = None
    decision: Decision | None = None  # None until decided
    key_id: str = ""  # X-Cache-Key
    upstream_seconds: float | None = None  # spent upstream (MISS) or saved (HIT, STALE)
    rows: RowFigures | None = None  # for a batch answered row by row
    usage: str | None = None  # how `usage` was computed for a merged answer: "exact" or "estimated"
    streamed: bool = False  # the answer was a stream (Server-Sent Events)
