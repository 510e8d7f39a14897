"""The policy addons: who may use the proxy (`ClientAccess`) and where it may connect (`EgressGuard`).

Glue only: the decisions are made by the pure `clients.py` and `egress.py`.

Load order: `ClientAccess`, then `EgressGuard`, then the privacy addon, then the cache.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import ip_address
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.net.http import url
from mitmproxy.proxy import mode_specs, server_hooks

from forward_proxy.cache.live import is_internal
from forward_proxy.errors import error_response
from forward_proxy.policy.clients import DEFAULT_CLIENT_NETWORKS, ClientNetworks, client_address
from forward_proxy.policy.egress import (
    Decision,
    EgressRules,
    IPAddress,
    log_fields,
    parse_ip_literal,
    parse_rules,
    preferred_address,
)

log = logging.getLogger(__name__)

EGRESS_METADATA = "fp.egress"  # the rule that decided, e.g. "class:loopback"
EGRESS_HOST_METADATA = "fp.egress.host"  # the requested host when the flow was pinned to an address

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class ClientAccess:
    """Refuses clients outside `allow_clients` at connect time; answers failed proxy auth in JSON."""

    def __init__(self) -> None:
        self.networks = ClientNetworks.parse(DEFAULT_CLIENT_NETWORKS)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "allow_clients",
            Sequence[str],
            list(DEFAULT_CLIENT_NETWORKS),
            """
            Client networks (CIDRs) that may use the proxy; a connection from anywhere else is closed
            at once and logged. Default: loopback and the private ranges. Repeat for several.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "allow_clients" in updated:
            try:
                self.networks = ClientNetworks.parse(ctx.options.allow_clients)
            except ValueError as exc:
                raise exceptions.OptionsError(str(exc)) from None

    def client_connected(self, client: connection.Client) -> None:
        if client.error or not client.peername or isinstance(client.proxy_mode, mode_specs.LocalMode):
            return
        try:
            admitted = self.networks.admits(client_address(str(client.peername[0])))
        except ValueError:
            admitted = False
        if not admitted:
            client.error = "refused: client address not in allow_clients"
            log.warning(
                "client refused " + log_fields({"rule": "allow_clients", "reason": "not in allow_clients"}),
                extra={"client": client.peername},
            )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._explain_auth_failure(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._explain_auth_failure(flow)

    def _explain_auth_failure(self, flow: http.HTTPFlow) -> None:
        """mitmproxy's `proxyauth` answers 407 (401 in reverse mode) in HTML; give it the JSON shape."""
        response = flow.response
        if (
            response is None
            or response.status_code not in (401, 407)
            or not getattr(ctx.options, "proxyauth", None)
            or "proxyauth" in flow.metadata
        ):
            return
        challenge = {
            name: response.headers[name]
            for name in ("Proxy-Authenticate", "WWW-Authenticate")
            if name in response.headers
        }
        flow.response = error_response(
            response.status_code,
            "proxy_auth_required",
            "This proxy needs credentials: send Proxy-Authorization: Basic <base64 user:password> "
            "(with requests: proxies={'http': 'http://user:password@proxy:port'}).",
            headers=challenge,
        )
        log.warning(
            "proxy auth refused " + log_fields({"method": flow.request.method}),
            extra={"client": flow.client_conn.peername},
        )


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """The system resolver (getaddrinfo in a thread), addresses in its order without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class EgressGuard:
    """Resolves each destination once, applies the egress policy, and pins the flow to the checked address.

    Plain HTTP is checked in `requestheaders`, CONNECT in `http_connect`; both before any connection
    exists. `server_connect` re-checks the address every server connection is about to use, so a path
    that bypasses the request-level check (another addon rewriting the host, a replay) still never
    reaches a denied address.
    """

    def __init__(self, resolver: Resolver = system_resolver) -> None:
        self.rules = EgressRules()
        self.resolver = resolver
        # Tunnels (CONNECT) this addon pinned, with the host name the client asked for: requests inside
        # an intercepted tunnel carry the pinned address as their host.
        self._tunnels: weakref.WeakKeyDictionary[connection.Server, str] = weakref.WeakKeyDictionary()

    def load(self, loader: Any) -> None:
        loader.add_option(
            "egress_allow",
            Sequence[str],
            [],
            """
            Destinations the proxy may always reach: hosts (api.example.com), domains (.example.com
            for it and its subdomains, *.example.com for subdomains only) or CIDRs. A CIDR entry
            overrides the built-in address classes (e.g. 169.254.10.0/24); host and domain entries never
            do. Repeat for several.
            """,
        )
        loader.add_option(
            "egress_deny",
            Sequence[str],
            [],
            """
            Destinations the proxy never reaches: hosts, domains (.example.com, *.example.com) or CIDRs.
            Wins over everything else. Repeat for several.
            """,
        )
        loader.add_option(
            "egress_deny_private",
            bool,
            False,
            "Refuse private destinations (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7).",
        )
        loader.add_option(
            "egress_deny_loopback",
            bool,
            False,
            "Refuse loopback destinations (127/8, ::1).",
        )
        loader.add_option(
            "egress_allow_only",
            bool,
            False,
            "Refuse every destination that no egress_allow entry names (an allowlist).",
        )

    def configure(self, updated: set[str]) -> None:
        if not updated & {
            "egress_allow",
            "egress_deny",
            "egress_deny_private",
            "egress_deny_loopback",
            "egress_allow_only",
        }:
            return
        try:
            self.rules = EgressRules(
                allow=parse_rules(ctx.options.egress_allow, "egress_allow"),
                deny=parse_rules(ctx.options.egress_deny, "egress_deny"),
                deny_private=ctx.options.egress_deny_private,
                deny_loopback=ctx.options.egress_deny_loopback,
                allow_only=ctx.options.egress_allow_only,
            )
        except ValueError as exc:
            raise exceptions.OptionsError(str(exc)) from None
        if self.rules.allow_only and not self.rules.allow:
            log.warning("egress_allow_only is on but egress_allow is empty: every destination is refused")

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.error is None:
            await self._guard(flow, tunnel=False)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.error is None:
            await self._guard(flow, tunnel=True)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.address is None or server.via is not None or server.error:
            return  # nothing to connect to, or an upstream proxy does the connecting
        if is_internal(server.address):
            return  # the cache's live relay in this process: a waiter following a stream, no egress
        host, port = server.address
        literal = parse_ip_literal(host)
        addresses = [literal] if literal is not None else await self._resolve_quietly(host, port)
        if not addresses:
            return  # unresolvable: mitmproxy's own connect fails the same way
        for address in addresses:
            decision = self.rules.check_connection(address)
            if not decision.allowed:
                server.error = f"egress denied: {decision.rule} ({decision.reason})"
                self._log(decision, host, port, data.client, stage="server_connect")
                return
        if literal is None:  # a name that skipped the request-level check: connect where we checked
            chosen = preferred_address(addresses)
            server.sni = server.sni or host
            server.address = (str(chosen), port)

    async def _guard(self, flow: http.HTTPFlow, *, tunnel: bool) -> None:
        request = flow.request
        host, port = request.host, request.port
        asked_for = self._tunnels.get(flow.server_conn) if not tunnel else None
        name = asked_for if asked_for is not None and flow.server_conn.address == (host, port) else host
        decision = self.rules.deny_by_name(name)
        if decision is None:
            try:
                addresses = await self._resolve(host, port)
            except OSError as exc:
                flow.response = error_response(
                    502,
                    "upstream_unresolvable",
                    f"The proxy could not resolve {host} ({exc}); check the host name.",
                    host=host,
                )
                unresolved = Decision(False, "unresolvable", str(exc), None)
                self._log(unresolved, host, port, flow.client_conn, method=request.method)
                return
            decision = self.rules.decide(name, addresses)
        flow.metadata[EGRESS_METADATA] = decision.rule
        self._log(decision, name, port, flow.client_conn, method=request.method)
        if not decision.allowed:
            flow.response = error_response(
                403,
                "egress_denied",
                f"The proxy does not connect to {name} ({decision.reason}; rule {decision.rule}). If this "
                "destination is needed, ask the proxy's operator to add it to egress_allow.",
                rule=decision.rule,
                host=name,
                address=str(decision.address) if decision.address is not None else None,
            )
            return
        assert decision.address is not None
        self._pin(flow, decision.address, tunnel=tunnel)

    def _pin(self, flow: http.HTTPFlow, address: IPAddress, *, tunnel: bool) -> None:
        """Make mitmproxy connect to `address`, keeping the Host header (and SNI for tunnels) as asked."""
        request = flow.request
        pinned = str(address)
        if request.host == pinned or isinstance(flow.client_conn.proxy_mode, mode_specs.UpstreamMode):
            return  # already an address, or the upstream proxy resolves and connects
        host = request.host
        if tunnel:
            self._tunnels[flow.server_conn] = host
            if flow.server_conn.sni is None:
                flow.server_conn.sni = host  # verify the upstream certificate against the name asked for
        elif request.host_header is None:
            request.host_header = url.hostport(request.scheme, host, request.port)
        flow.metadata[EGRESS_HOST_METADATA] = host
        request.data.host = pinned  # not `request.host =`, which would rewrite the Host header too

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        literal = parse_ip_literal(host)
        if literal is not None:
            return [literal]
        answers = await self.resolver(host, port)
        addresses = [ip_address(answer.split("%", 1)[0]) for answer in answers]
        if not addresses:
            raise OSError(f"no address for {host}")
        return addresses

    async def _resolve_quietly(self, host: str, port: int) -> list[IPAddress]:
        try:
            return await self._resolve(host, port)
        except OSError:
            return []

    def _log(
        self,
        decision: Decision,
        host: str,
        port: int,
        client: connection.Client,
        *,
        method: str | None = None,
        stage: str | None = None,
    ) -> None:
        """One canonical line per decision: `egress decision=deny rule=class:metadata host=... reason=...`."""
        fields = {
            "decision": decision.verdict,
            "rule": decision.rule,
            "host": host,
            "address": decision.address,
            "port": port,
            "method": method,
            "stage": stage,
            "reason": decision.reason,
        }
        level = logging.INFO if decision.allowed else logging.WARNING
        log.log(level, "egress " + log_fields(fields), extra={"client": client.peername})
