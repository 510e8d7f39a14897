"""Cache keys: everything that changes an answer, hashed with a secret into an opaque key.

The key covers the method, scheme, host, port, path, canonical query and canonical body, the request
headers that change the answer (Content-Type, Accept and configured ones), the credential partition
(an HMAC of every credential header of the common model APIs, `credentials.py`, and configured ones:
tenants never share entries), the
`X-Cache-Namespace` header and the upstream's deployment version. It is an HMAC under the proxy's
secret, so nobody without the secret can compute the key of a guessed request; `key_id` is its first
16 hex digits (the `X-Cache-Key` header), which reveals nothing about the request.

>>> parts = KeyParts("POST", "http", "127.0.0.1", 8000, "/v1/embeddings", "", b'json:{"input":"hi"}',
...                  (("content-type", "application/json"),), "", "", "v1")
>>> key = cache_key(parts, b"secret" * 4)
>>> key.startswith("fp1:"), len(key_id(key))
(True, 16)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from forward_proxy.cache.credentials import DEFAULT_PARTITION_HEADERS

KEY_HEADERS = ("host", "content-type", "accept")
PARTITION_HEADERS = DEFAULT_PARTITION_HEADERS  # the credential headers of the common model APIs
NAMESPACE_HEADER = "x-cache-namespace"
_PREFIX = "fp1:"  # bump when the key material changes, so old entries are never misread


@dataclass(frozen=True)
class KeyParts:
    method: str
    scheme: str
    host: str
    port: int
    path: str  # without query
    query: str  # canonical
    body: bytes  # canonical
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value) of the key headers, in a fixed order
    partition: str  # credential partition, "" when the request carries no credentials
    namespace: str
    version: str | None


def key_headers(get: Callable[[str], str | None], extra: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(name, value) of Host, Content-Type, Accept and the `extra` headers, as `get(name)` returns them."""
    names = dict.fromkeys((*KEY_HEADERS, *(name.lower() for name in extra)))
    return tuple((name, _normalise(name, get(name))) for name in names)


def _normalise(name: str, value: str | None) -> str:
    if value is None:
        return ""
    if name == "content-type":
        return ";".join(part.strip() for part in value.lower().split(";"))
    return value.strip()


def partition(get: Callable[[str], str | None], extra: Sequence[str], secret: bytes) -> str:
    """HMAC of the credential headers (`credentials.DEFAULT_PARTITION_HEADERS` and `extra`); "" if none."""
    names = dict.fromkeys((*PARTITION_HEADERS, *(name.lower() for name in extra)))
    credentials = [(name, value) for name in names if (value := get(name)) is not None]
    if not credentials:
        return ""
    mac = hmac.new(secret, b"partition", hashlib.sha256)
    for name, value in credentials:
        _update(mac, name.encode(), value.encode())
    return mac.hexdigest()


def cache_key(parts: KeyParts, secret: bytes) -> str:
    mac = hmac.new(secret, b"key", hashlib.sha256)
    _update(
        mac,
        parts.method.upper().encode(),
        parts.scheme.lower().encode(),
        parts.host.lower().encode(),
        str(parts.port).encode(),
        parts.path.encode("utf-8", "surrogateescape"),  # mitmproxy keeps non-UTF-8 path bytes as surrogates
        parts.query.encode(),
        parts.body,
        *(f"{name}:{value}".encode() for name, value in parts.headers),
        parts.partition.encode(),
        parts.namespace.encode(),
        b"-" if parts.version is None else b"=" + parts.version.encode(),
    )
    return _PREFIX + mac.hexdigest()


def key_id(key: str) -> str:
    """The short opaque id of a key (X-Cache-Key)."""
    return key[len(_PREFIX) : len(_PREFIX) + 16]


def _update(mac: hmac.HMAC, *fields: bytes) -> None:
    for field in fields:  # length-prefixed, so no two different field lists give the same bytes
        mac.update(len(field).to_bytes(8, "big"))
        mac.update(field)
