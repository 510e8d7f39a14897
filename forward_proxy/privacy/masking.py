"""Which request headers leave the proxy: the client-identity headers and the `forwarded_for` modes.

Pure code: `Masking.apply` works on any case-insensitive header mapping (mitmproxy's `Headers`).

Modes (Squid's `forwarded_for` names):

- `delete` (default): every identity header is removed; the upstream learns nothing about the client
  but its pseudonym.
- `truncate`: identity headers removed, then `X-Forwarded-For: <client address>` as the only hop.
- `transparent`: identity headers pass as the client sent them; the proxy adds none.

An identity header is one of `IDENTITY_HEADERS`, or any header whose name, in lower case with `_` read
as `-` (servers such as nginx and PHP's CGI treat `X_Forwarded_For` as `X-Forwarded-For`), matches one of
`IDENTITY_PATTERNS`: whatever carries a client address (`*forwarded*`, `*client-ip`, `*real-ip`,
`*remote-addr`, ...) or a client certificate (`*client-cert*`, `*ssl-client*`, ...).

In every mode the proxy's own credentials and hop-by-hop headers (`Proxy-Authorization`,
`Proxy-Connection`), the extra `mask_headers` and any client-sent copy of the pseudonym header are removed,
and the proxy adds no `Via`.

>>> headers = {"X-Forwarded-For": "10.1.2.3", "Accept": "*/*", "Proxy-Authorization": "Basic eDp5"}
>>> Masking("delete").apply(headers, client="127.0.0.2")
['X-Forwarded-For', 'Proxy-Authorization']
>>> headers
{'Accept': '*/*'}
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field

MODES = ("delete", "truncate", "transparent")

# Headers that carry a client's address or identity on their way through proxies and CDNs.
IDENTITY_HEADERS: tuple[str, ...] = (
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-Port",
    "X-Forwarded-Server",
    "X-Real-IP",
    "X-Client-IP",
    "X-Originating-IP",
    "True-Client-IP",
    "Client-IP",
    "CF-Connecting-IP",
    "Fastly-Client-IP",
    "X-Cluster-Client-IP",
    "Via",
    "Forwarded-For",
    "X-Forwarded",
    "X-Original-Forwarded-For",
    "X-Forwarded-Client-Cert",  # Envoy / Istio: the client's certificate identity (SPIFFE id, hash)
    "X-Envoy-External-Address",
    "X-ProxyUser-Ip",
    "X-Azure-ClientIP",
    "X-Azure-SocketIP",
    "X-Appengine-User-IP",
    "X-Remote-Addr",
    "X-Remote-IP",
    "Remote-Addr",
    "X-Client-Cert",
    "X-SSL-Client-Cert",
    "X-ARR-ClientCert",  # Azure App Service
    "X-Amzn-Mtls-Clientcert",  # AWS ALB mutual TLS
)

# The rule behind the list, for the headers no list can name: a name (lower case, `_` read as `-`) that
# matches any of these carries a client address or a client certificate identity.
IDENTITY_PATTERNS: tuple[str, ...] = (
    "*forwarded*",  # Forwarded, X-Forwarded-*, X-Original-Forwarded-For, Forwarded-For, X-Forwarded
    "*client-ip*",  # X-Client-IP, True-Client-IP, Fastly-Client-IP, X-Cluster-Client-IP
    "*clientip*",  # X-Azure-ClientIP
    "*real-ip*",  # X-Real-IP
    "*user-ip*",  # X-Appengine-User-IP, X-ProxyUser-Ip
    "*connecting-ip*",  # CF-Connecting-IP, CF-Connecting-IPv6
    "*originating-ip*",  # X-Originating-IP
    "*remote-addr*",  # X-Remote-Addr
    "*remote-ip*",
    "*client-addr*",
    "*external-address*",  # X-Envoy-External-Address
    "*client-cert*",  # X-Forwarded-Client-Cert, X-Client-Cert, X-SSL-Client-Cert
    "*clientcert*",  # X-ARR-ClientCert, X-Amzn-Mtls-Clientcert
    "*ssl-client*",  # X-SSL-Client-DN, X-SSL-Client-Verify
    "*tls-client*",
)
_IDENTITY_PATTERN = re.compile("|".join(fnmatch.translate(pattern) for pattern in IDENTITY_PATTERNS))


def is_identity_header(name: str) -> bool:
    """Whether a header named `name` may carry a client's address or certificate identity.

    >>> [is_identity_header(n) for n in ("X_Forwarded_For", "X-Azure-ClientIP", "Content-Type")]
    [True, True, False]
    """
    normal = name.lower().replace("_", "-")
    return normal in _IDENTITY_NAMES or _IDENTITY_PATTERN.match(normal) is not None


_IDENTITY_NAMES = frozenset(name.lower() for name in IDENTITY_HEADERS)

# Meant for this proxy only, never for an upstream, whatever the mode.
PROXY_HEADERS: tuple[str, ...] = ("Proxy-Authorization", "Proxy-Connection")


@dataclass(frozen=True)
class Masking:
    mode: str = "delete"
    extra: tuple[str, ...] = ()
    pseudonym_header: str = ""
    _always: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"forwarded_for must be one of {', '.join(MODES)}, not {self.mode!r}")
        always = {h.lower() for h in (*PROXY_HEADERS, *self.extra)}
        if self.pseudonym_header:
            always.add(self.pseudonym_header.lower())
        object.__setattr__(self, "_always", frozenset(always))

    @property
    def hides_clients(self) -> bool:
        """True when no client address leaves the proxy (mode `delete`)."""
        return self.mode == "delete"

    def removes(self, name: str) -> bool:
        lowered = name.lower()
        return lowered in self._always or (self.mode != "transparent" and is_identity_header(lowered))

    def apply(self, headers: MutableMapping[str, str], client: str) -> list[str]:
        """Mask `headers` in place for a request from `client`; returns the header names removed."""
        removed = _unique(name for name in list(headers.keys()) if self.removes(name))
        for name in removed:
            del headers[name]
        if self.mode == "truncate":
            headers["X-Forwarded-For"] = client
        return removed


def _unique(names: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for name in names:
        if name.lower() not in seen:
            seen.add(name.lower())
            result.append(name)
    return result
