"""CONNECT tunnels pass through without TLS interception, except to the hosts in `intercept_hosts`.

mitmproxy decrypts every tunnel by default, which makes every HTTPS client trust mitmproxy's CA. The
proxy needs that only to cache an HTTPS model endpoint, so it leaves tunnels alone unless the host is
listed (fnmatch globs, case-insensitive, matched against the CONNECT host and the SNI).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from mitmproxy import ctx, tls


def should_intercept(patterns: Sequence[str], *hosts: str | None) -> bool:
    """Whether any of `hosts` (CONNECT host, SNI) matches one of the glob `patterns`."""
    names = [host.lower().rstrip(".") for host in hosts if host]
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in patterns for name in names)


class HttpsInterception:
    def load(self, loader: Any) -> None:
        loader.add_option(
            "intercept_hosts",
            Sequence[str],
            [],
            "Hosts (globs such as `models.internal` or `*.example.com`) whose HTTPS tunnels are decrypted so "
            "their requests can be cached; clients must then trust mitmproxy's CA. Every other CONNECT "
            "tunnel passes through untouched.",
        )

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        address = data.context.server.address
        connect_host = address[0] if address else None
        if not should_intercept(ctx.options.intercept_hosts, connect_host, data.client_hello.sni):
            data.ignore_connection = True
