"""The admin listener addon: serves `/stats`, `/metrics` and the dashboard from inside the proxy.

Options: `admin_port` (0, the default, turns the listener off), `admin_host` (127.0.0.1), and who may
use it: `admin_allow_clients` (empty: the proxy's own `allow_clients`), `admin_allow_hosts` (`Host`
names besides loopback and `admin_host`), `admin_max_connections` and `admin_idle_timeout`. The server
(`server.py`) runs on mitmproxy's event loop and reads the store in the loop's executor, so it never
blocks the proxy; it reads the backend's shared counters (the cache directory's, or Redis's), so it
shows the sum of every proxy process on that backend (this process's own last counts reach it within
the counters' flush interval).

It is also the statistics' own addon: the `stats_*` options bound the counters' labels (`LabelBounds`,
applied by every `Counters` of the process while the proxy runs), and its `response` hook tells them
when an upstream answered a forwarded request (`origin_answered`), so origins nobody answered at are
never stored.

A port that cannot be served is an error at start-up: it is logged as one, naming the port and the fix,
and mitmproxy's error check then ends the process (exit 1) before the launcher announces it is ready.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from mitmproxy import ctx, exceptions, http

from forward_proxy.cache.config import CacheConfig
from forward_proxy.policy.clients import DEFAULT_CLIENT_NETWORKS, ClientNetworks
from forward_proxy.stats.counters import LabelBounds, origin_answered, set_label_bounds
from forward_proxy.stats.report import read_report
from forward_proxy.stats.server import LOOPBACK_HOSTS, AdminAccess, AdminServer
from forward_proxy.store.backend import open_backend
from forward_proxy.store.base import CacheStore, CounterStore, StoreError

log = logging.getLogger(__name__)

_RESTART_ON = frozenset(
    {
        "admin_port",
        "admin_host",
        "cache_dir",
        "cache_backend",
        "allow_clients",
        "admin_allow_clients",
        "admin_allow_hosts",
        "admin_max_connections",
        "admin_idle_timeout",
    }
)


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
        loader.add_option(
            "stats_max_label_length",
            int,
            LabelBounds.max_length,
            "Longest origin, route or model label the statistics keep; longer ones are cut (ending in ~).",
        )
        loader.add_option(
            "stats_max_origins",
            int,
            LabelBounds.max_origins,
            "Origins the statistics count apart; more are counted under the origin 'other'.",
        )
        loader.add_option(
            "stats_max_routes",
            int,
            LabelBounds.max_routes,
            "Routes per origin the statistics count apart; more are counted under the route 'other'.",
        )
        loader.add_option(
            "stats_max_models",
            int,
            LabelBounds.max_models,
            """
            Models per origin and route the statistics count apart (the model comes from request
            bodies: any client can invent one); more are counted under the model 'other'.
            """,
        )
        loader.add_option(
            "stats_count_unanswered_origins",
            bool,
            False,
            """
            Count origins where no upstream ever answered (closed ports, refused or unreachable hosts).
            Off (the default), their requests are not counted until an upstream answers there.
            """,
        )
        loader.add_option(
            "admin_allow_clients",
            Sequence[str],
            [],
            """
            Client networks (CIDRs) that may use the admin listener; others are disconnected at once.
            Empty (the default): the same networks as allow_clients.
            """,
        )
        loader.add_option(
            "admin_allow_hosts",
            Sequence[str],
            [],
            """
            Host names the admin listener answers to besides localhost, 127.0.0.1, ::1 and admin_host
            (requests naming another Host get 403, which stops DNS-rebinding pages). Add the name you
            browse or scrape it by, e.g. stats.internal.
            """,
        )
        loader.add_option(
            "admin_max_connections",
            int,
            64,
            "Connections the admin listener keeps open at once; more are closed at once.",
        )
        loader.add_option(
            "admin_idle_timeout",
            int,
            10,
            "Seconds an admin connection may stay idle (or take to send its request) before it is closed.",
        )

    def configure(self, updated: set[str]) -> None:
        for name in _BOUND_OPTIONS:
            if name in updated and getattr(ctx.options, name) < 1:
                raise exceptions.OptionsError(f"{name}: give 1 or more.")
        if self._running and updated & {*_BOUND_OPTIONS, "stats_count_unanswered_origins"}:
            set_label_bounds(_label_bounds())
        if "admin_port" in updated and not 0 <= ctx.options.admin_port <= 65535:
            raise exceptions.OptionsError(
                f"admin_port: {ctx.options.admin_port} is not a port; give 1-65535, or 0 to turn it off."
            )
        if "admin_max_connections" in updated and ctx.options.admin_max_connections < 1:
            raise exceptions.OptionsError("admin_max_connections: give 1 or more connections.")
        if "admin_idle_timeout" in updated and ctx.options.admin_idle_timeout < 1:
            raise exceptions.OptionsError("admin_idle_timeout: give 1 or more seconds.")
        if "admin_allow_clients" in updated:
            try:
                ClientNetworks.parse(ctx.options.admin_allow_clients or DEFAULT_CLIENT_NETWORKS)
            except ValueError as exc:
                raise exceptions.OptionsError(f"admin_{exc}") from None
        if self._running and updated & _RESTART_ON:
            self._stop()
            self._start()

    def running(self) -> None:
        self._running = True
        set_label_bounds(_label_bounds())  # every Counters of this process (the cache's) applies them
        self._start()

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.server_conn.timestamp_start is not None:  # mitmproxy forwarded it: an upstream answered
            request = flow.request
            origin_answered(f"{request.scheme}://{request.host}:{request.port}")

    def done(self) -> None:
        self._running = False
        set_label_bounds(LabelBounds())
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
            self.server = AdminServer(
                lambda: read_report(cache, counters), host, port, access=_access(host)
            ).start()
        except (OSError, StoreError, ValueError) as exc:
            self._stop()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.error(
                f"admin listener: cannot serve on {host}:{port} ({reason}). Choose another port with "
                "--admin-port (or --set admin_port=0 to run without the listener), or stop what holds it."
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


_BOUND_OPTIONS = ("stats_max_label_length", "stats_max_origins", "stats_max_routes", "stats_max_models")


def _label_bounds() -> LabelBounds:
    options = ctx.options
    return LabelBounds(
        max_length=max(2, options.stats_max_label_length),
        max_origins=options.stats_max_origins,
        max_routes=options.stats_max_routes,
        max_models=options.stats_max_models,
        hold_unanswered=not options.stats_count_unanswered_origins,
    )


def _access(host: str) -> AdminAccess:
    """Who may use the listener, from the options (checked in `configure`)."""
    networks = ctx.options.admin_allow_clients
    if not networks:
        networks = getattr(ctx.options, "allow_clients", None) or DEFAULT_CLIENT_NETWORKS
    return AdminAccess(
        admits=ClientNetworks.parse(networks).admits,
        hosts=LOOPBACK_HOSTS | {host.strip("[]"), *ctx.options.admin_allow_hosts},
        max_connections=ctx.options.admin_max_connections,
        idle_timeout=float(ctx.options.admin_idle_timeout),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
