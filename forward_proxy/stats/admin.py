"""The admin listener addon: serves `/stats`, `/metrics` and the dashboard from inside the proxy.

Options: `admin_port` (0, the default, turns the listener off) and `admin_host` (127.0.0.1). The
server itself (`server.py`) runs in its own threads, so it never blocks the proxy; it reads the backend's
shared counters (the cache directory's, or Redis's), so it shows the sum of every proxy process on that
backend (this process's own last counts reach it within the counters' flush interval).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from mitmproxy import ctx, exceptions

from forward_proxy.cache.config import CacheConfig
from forward_proxy.stats.report import read_report
from forward_proxy.stats.server import AdminServer
from forward_proxy.store.backend import open_backend
from forward_proxy.store.base import CacheStore, CounterStore, StoreError

log = logging.getLogger(__name__)

_RESTART_ON = frozenset({"admin_port", "admin_host", "cache_dir", "cache_backend"})


class AdminListener:
    def __init__(self) -> None:
        self.server: AdminServer | None = None
        self._stores: tuple[CacheStore, CounterStore] | None = None
        self._running = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "admin_port",
            int,
            0,
            """
            Port of the admin listener: / (dashboard), /stats (JSON), /stats/history and /metrics
            (Prometheus), answered directly, without any proxy setting. 0 turns it off.
            """,
        )
        loader.add_option(
            "admin_host",
            str,
            "127.0.0.1",
            "Address of the admin listener. Keep it on loopback unless its statistics may be public.",
        )

    def configure(self, updated: set[str]) -> None:
        if "admin_port" in updated and not 0 <= ctx.options.admin_port <= 65535:
            raise exceptions.OptionsError(
                f"admin_port: {ctx.options.admin_port} is not a port; give 1-65535, or 0 to turn it off."
            )
        if self._running and updated & _RESTART_ON:
            self._stop()
            self._start()

    def running(self) -> None:
        self._running = True
        self._start()

    def done(self) -> None:
        self._running = False
        self._stop()

    def _start(self) -> None:
        host, port = ctx.options.admin_host, ctx.options.admin_port
        if not port:
            return
        try:
            config = CacheConfig.from_options(ctx.options)
            backend = open_backend(config.backend, config.directory, None)  # the shared counters
            self._stores = backend.entries, backend.counters
            cache, counters = self._stores
            self.server = AdminServer(lambda: read_report(cache, counters), host, port).start()
        except (OSError, StoreError, ValueError) as exc:
            self._stop()
            log.error(
                f"admin listener: cannot serve on {host}:{port} ({exc}); the proxy runs without it. "
                "Choose another admin_port (--admin-port)."
            )
            return
        if not _is_loopback(host):
            log.warning(
                f"admin listener on {host}:{port} answers anyone who can reach it; its statistics name "
                "origins, routes and models."
            )
        log.info(f"admin listener on {self.server.url} (dashboard; /stats, /metrics)")

    def _stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._stores is not None:
            for store in self._stores:
                store.close()
            self._stores = None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
