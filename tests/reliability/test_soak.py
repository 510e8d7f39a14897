"""A bounded soak: a real `forward-proxy run` under a fixed concurrency of clients sending a mix of hits,
misses, bypasses and external (uncached) requests to the recording upstream for SOAK_SECONDS.

It checks that no request failed or got a wrong answer, that the proxy's memory (VmRSS of its PID) is
flat after warm-up, and that the proxy's own counters (/stats on the admin port) add up exactly to what
the clients sent and saw.

    SOAK_SECONDS=600 SOAK_CONCURRENCY=16 .venv/bin/python -m pytest tests/reliability/test_soak.py -s

prints the figures (and writes them as JSON to $SOAK_REPORT when set).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.processes import free_port, wait_for_http
from tests.support.proxy import start_proxy
from tests.support.upstream import Upstream

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "8"))
WARM_UP = 0.3  # the first 30% of the run: entries, SQLite's page cache and pools fill up
# Growth of the proxy's RSS allowed from the end of the warm-up to the end of the run.
RSS_TOLERANCE_BYTES = 24 * 1024 * 1024
RSS_TOLERANCE_RATIO = 0.15
HOT_INPUTS = 32  # the inputs repeated by the "hit" share of the mix
ROUTE = "/v1/embeddings"
EXTERNAL = "/external"  # no cache rule matches: mitmproxy forwards it, the cache counts nothing
DECISION_COUNTERS = {
    "HIT": "hits",
    "MISS": "misses",
    "BYPASS": "bypasses",
    "REFRESH": "refreshes",
    "COALESCED": "coalesced",
    "STALE": "stale",
    "PARTIAL": "misses",
}
# Twenty requests in a fixed order, each worker starting elsewhere: 10 hits, 5 misses, 2 bypasses, 3 external.
MIX = (
    *("hit", "miss", "hit", "external", "hit", "bypass", "hit", "miss", "hit", "external"),
    *("hit", "miss", "hit", "miss", "hit", "bypass", "hit", "miss", "external", "hit"),
)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Tally:
    """What the clients sent and saw (one per worker, merged at the end)."""

    sent: Counter[str] = field(default_factory=Counter)  # by kind
    decisions: Counter[str] = field(default_factory=Counter)  # by X-Cache
    failures: list[str] = field(default_factory=list)

    def merge(self, other: Tally) -> None:
        self.sent.update(other.sent)
        self.decisions.update(other.decisions)
        self.failures.extend(other.failures)


def worker(index: int, proxy_url: str, upstream: Upstream, deadline: float, tally: Tally) -> None:
    session = requests.Session()
    session.trust_env = False
    session.proxies.update({"http": proxy_url})
    sequence = 0
    with session:
        while time.monotonic() < deadline:
            kind = MIX[(sequence + index) % len(MIX)]
            sequence += 1
            text = {
                "hit": f"hot {sequence % HOT_INPUTS}",
                "miss": f"unique {index}-{sequence}",
                "bypass": f"bypass {index}-{sequence}",
                "external": "",
            }[kind]
            try:
                if kind == "external":
                    answer = session.get(upstream.url(f"{EXTERNAL}/{index}-{sequence}"), timeout=30)
                else:
                    headers = {"Cache-Control": "no-store"} if kind == "bypass" else {}
                    answer = session.post(
                        upstream.url(ROUTE), json={"input": text}, headers=headers, timeout=30
                    )
            except requests.RequestException as exc:
                tally.failures.append(f"{kind}: {exc}")
                continue
            tally.sent[kind] += 1
            if answer.status_code != 200:
                tally.failures.append(f"{kind}: {answer.status_code} {answer.text[:200]}")
                continue
            document = answer.json()
            if kind == "external":
                if "X-Cache" in answer.headers or document["path"] != f"{EXTERNAL}/{index}-{sequence}":
                    tally.failures.append(f"external: wrong answer {document}")
                continue
            if document["body"] != {"input": text}:  # an answer for another request: poisoned
                tally.failures.append(f"{kind}: answer for {document['body']} instead of {text!r}")
            tally.decisions[answer.headers["X-Cache"]] += 1


def read_stats(admin: str) -> dict[str, Any]:
    opener = requests.Session()
    opener.trust_env = False
    with opener:
        stats: dict[str, Any] = opener.get(f"{admin}/stats", timeout=10).json()
    return stats


def test_soak(tmp_path: Path) -> None:
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    with (
        Upstream(model_version="v1") as upstream,
        start_proxy(tmp_path, "--admin-port", str(admin_port)) as proxy,
    ):
        wait_for_http(f"{admin}/stats", timeout=30)
        pid = proxy.process.pid
        started = time.monotonic()
        deadline = started + SECONDS
        tallies = [Tally() for _ in range(CONCURRENCY)]
        threads = [
            threading.Thread(target=worker, args=(index, proxy.url, upstream, deadline, tally), daemon=True)
            for index, tally in enumerate(tallies)
        ]
        samples: list[tuple[float, int]] = []
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            samples.append((time.monotonic() - started, rss_bytes(pid)))
            time.sleep(0.5)
        for thread in threads:
            thread.join(timeout=60)
        elapsed = time.monotonic() - started
        total = Tally()
        for tally in tallies:
            total.merge(tally)

        cached = sum(count for kind, count in total.sent.items() if kind != "external")
        expected = Counter({"requests": cached})
        for decision, count in total.decisions.items():
            expected[DECISION_COUNTERS[decision]] += count
        names = ("requests", "hits", "misses", "bypasses", "refreshes", "coalesced", "stale")
        stats = read_stats(admin)
        give_up = time.monotonic() + 15  # the proxy writes its counts every quarter of a second
        while stats["requests"] < cached and time.monotonic() < give_up:
            time.sleep(0.25)
            stats = read_stats(admin)
        counted = {name: stats[name] for name in names}

        after_warm_up = [rss for at, rss in samples if at >= WARM_UP * SECONDS]
        window = max(1, len(after_warm_up) // 10)
        rss_start = statistics.median(after_warm_up[:window])
        rss_end = statistics.median(after_warm_up[-window:])
        rss_peak = max(rss for _, rss in samples)
        external_calls = sum(1 for received in upstream.received() if received.path.startswith(EXTERNAL))
        figures = {
            "seconds": round(elapsed, 1),
            "concurrency": CONCURRENCY,
            "requests": sum(total.sent.values()),
            "requests_per_second": round(sum(total.sent.values()) / elapsed, 1),
            "sent": dict(total.sent),
            "decisions": dict(total.decisions),
            "counted": counted,
            "failures": len(total.failures),
            "rss_after_warm_up_mib": round(rss_start / 2**20, 1),
            "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_peak_mib": round(rss_peak / 2**20, 1),
            "upstream_calls": {
                ROUTE: upstream.calls(ROUTE),
                EXTERNAL: external_calls,
            },
        }
        print("\nsoak figures:", json.dumps(figures, indent=2))
        if os.environ.get("SOAK_REPORT"):
            Path(os.environ["SOAK_REPORT"]).write_text(json.dumps(figures, indent=2) + "\n")

        assert not total.failures, total.failures[:10]
        assert total.sent["hit"] and total.sent["miss"] and total.sent["bypass"] and total.sent["external"]
        assert counted == {name: expected[name] for name in names}, (counted, dict(expected))
        assert stats["upstream_errors"] == 0 and stats["store_errors"] == 0
        # Nothing lost upstream: every miss and bypass made exactly one call, hits and coalesced none.
        assert upstream.calls(ROUTE) == expected["misses"] + expected["bypasses"]
        assert external_calls == total.sent["external"]
        growth = rss_end - rss_start
        allowed = max(RSS_TOLERANCE_BYTES, RSS_TOLERANCE_RATIO * rss_start)
        assert growth <= allowed, f"the proxy's RSS grew {growth / 2**20:.1f} MiB after warm-up: {figures}"
        assert proxy.process.proc is not None and proxy.process.proc.poll() is None
