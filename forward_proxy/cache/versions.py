"""The deployment version (X-Model-Version) each service runs now, and when to re-check it.

A service is an origin together with the `Host` its clients name: behind a name-based ingress (KServe,
Knative) one address serves many services, each with its own version. The proxy learns a service's
version from every response it sees and from cheap re-checks (a GET of `version_check_path` with the
service's `Host`). An entry is served only when it was computed by the version the service runs now;
to bound how long a redeploy can go unnoticed, the knowledge has an age:

    age < interval / 2     fresh: serve hits
    interval / 2 <= age    due: serve hits, and re-check in the background
    interval <= age        expired (or never known): re-check before serving a hit

So under steady traffic hits never wait, and no entry of an old version is served more than about
`interval` seconds after the origin changed. An interval of 0 turns re-checks off: the version is then
learned from responses only.

>>> book = VersionBook(interval=5.0)
>>> book.state("http://m:8000", now=0.0)
<Knowledge.EXPIRED: 'expired'>
>>> changed = book.learn("http://m:8000", "v2", now=10.0)
>>> book.current("http://m:8000"), book.state("http://m:8000", now=13.0).value
('v2', 'due')
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Knowledge(enum.Enum):
    FRESH = "fresh"
    DUE = "due"
    EXPIRED = "expired"


@dataclass
class _Known:
    version: str | None
    confirmed_at: float


class VersionBook:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._origins: dict[str, _Known] = {}

    def current(self, origin: str) -> str | None:
        """The version the origin runs as far as known; None when it sends none (or is not known yet)."""
        known = self._origins.get(origin)
        return known.version if known is not None else None

    def known(self, origin: str) -> bool:
        return origin in self._origins

    def learn(self, origin: str, version: str | None, now: float) -> bool:
        """Record what the origin said now; whether that changed the version."""
        known = self._origins.get(origin)
        if known is None:
            self._origins[origin] = _Known(version, now)
            return version is not None
        changed = known.version != version
        known.version = version
        known.confirmed_at = max(known.confirmed_at, now)
        return changed

    def state(self, origin: str, now: float) -> Knowledge:
        known = self._origins.get(origin)
        if self.interval <= 0:
            return Knowledge.FRESH  # re-checks off: only responses teach versions
        if known is None or now - known.confirmed_at >= self.interval:
            return Knowledge.EXPIRED
        if now - known.confirmed_at >= self.interval / 2:
            return Knowledge.DUE
        return Knowledge.FRESH

    def snapshot(self) -> dict[str, str | None]:
        return {origin: known.version for origin, known in self._origins.items()}
