"""What the cache may do, as pure decisions: request directives, storability, freshness, staleness.

Requests steer the cache with standard Cache-Control directives:

    no-cache        skip the lookup, fetch from upstream and refresh the entry (also `Pragma: no-cache`)
    no-store        neither read nor write the cache
    max-age=N       accept only an entry at most N seconds old
    only-if-cached  answer from the cache or with 504, never contact the upstream

A response is stored only when its status is one of the configured ones, it carries no
`Cache-Control: no-store | private | no-cache`, sets no cookie, varies on no request header outside
the key (`Vary`), is not streamed (text/event-stream) and fits the entry size limit. Its lifetime is the TTL, shortened by a response `s-maxage` or `max-age`.

>>> request_directives("max-age=30, no-transform", None)
RequestDirectives(no_cache=False, no_store=False, max_age=30.0, only_if_cached=False)
"""

from __future__ import annotations

import enum
import json
from collections.abc import Collection
from dataclasses import dataclass

from forward_proxy.cache.keys import KEY_HEADERS, PARTITION_HEADERS
from forward_proxy.store.base import Entry


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """`Cache-Control` as {directive: argument or None}; names lower-case, quotes removed."""
    directives: dict[str, str | None] = {}
    if not value:
        return directives
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        if name:
            directives[name.strip().lower()] = argument.strip().strip('"') if argument else None
    return directives


def _seconds(argument: str | None) -> float | None:
    if argument is None:
        return None
    try:
        seconds = float(argument)
    except ValueError:
        return 0.0  # an invalid delta-seconds is treated as 0 (RFC 9111 4.2.1: "stale")
    return max(seconds, 0.0)


@dataclass(frozen=True)
class RequestDirectives:
    no_cache: bool = False
    no_store: bool = False
    max_age: float | None = None
    only_if_cached: bool = False


def request_directives(cache_control: str | None, pragma: str | None) -> RequestDirectives:
    directives = parse_cache_control(cache_control)
    no_cache = "no-cache" in directives or (
        not cache_control and pragma is not None and "no-cache" in pragma.lower()
    )
    return RequestDirectives(
        no_cache=no_cache,
        no_store="no-store" in directives,
        max_age=_seconds(directives["max-age"]) if "max-age" in directives else None,
        only_if_cached="only-if-cached" in directives,
    )


def opaque_server_error(status: int, header: dict[str, str], content: bytes) -> bool:
    """Whether an upstream's 5xx answer says nothing a client can read: no JSON body (an HTML page of a
    load balancer, an empty body, a garbled one). The proxy answers such a failure itself, as a 502 in its
    JSON error shape; a 5xx with a JSON body (the model API's own errors, `Retry-After` and all) is passed
    on as sent. `header` maps lower-case names.

    >>> opaque_server_error(503, {"content-type": "text/html"}, b"<h1>503</h1>")
    True
    >>> opaque_server_error(500, {"content-type": "application/json"}, b'{"error": {"code": "x"}}')
    False
    >>> opaque_server_error(500, {"content-type": "application/json"}, b'{"error": ')
    True
    >>> opaque_server_error(404, {"content-type": "text/html"}, b"<h1>404</h1>")
    False
    """
    if status < 500:
        return False
    media = header.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or media.endswith("+json")
    return not is_json or (bool(content) and unparsable_json(header, content)) or not content


def unparsable_json(header: dict[str, str], content: bytes) -> bool:
    """Whether an answer says it is JSON but its body does not parse: cut short or garbled by a failing
    upstream, behind framing that looks right. Such an answer is passed on but never stored, or it would
    be served for the whole TTL after the upstream recovered. `header` maps lower-case names; encoded
    (compressed) bodies are not looked into.

    >>> unparsable_json({"content-type": "application/json"}, b'{"data": [1, 2')
    True
    >>> unparsable_json({"content-type": "application/json; charset=utf-8"}, b'{"data": [1, 2]}')
    False
    >>> unparsable_json({"content-type": "text/plain"}, b'{"data"')
    False
    """
    media = header.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        return False
    if header.get("content-encoding", "identity").strip().lower() != "identity":
        return False
    try:
        json.loads(content)
    except ValueError:  # UnicodeDecodeError included
        return True
    return False


def unstorable_reason(
    status_code: int,
    header: dict[str, str],
    content_length: int,
    statuses: Collection[int],
    max_entry_size: int,
    keyed_headers: Collection[str] = (*KEY_HEADERS, *PARTITION_HEADERS),
    whole_stream: bool = False,
) -> str | None:
    """Why a response must not be stored, or None when it may be. `header` maps lower-case names.

    `keyed_headers` (lower-case) are the request headers the cache key covers: an answer that varies on
    any other request header (`Vary: Accept-Language`) would be served to requests it does not fit.
    `whole_stream`: a Server-Sent Events answer was recorded from its first event to its end."""
    if status_code not in statuses:
        return f"status {status_code}"
    directives = parse_cache_control(header.get("cache-control"))
    for directive in ("no-store", "private", "no-cache"):
        if directive in directives:
            return f"Cache-Control: {directive}"
    if "set-cookie" in header:
        return "sets a cookie"
    if header.get("vary", "").strip() == "*":
        return "Vary: *"
    varying = (name.strip().lower() for name in header.get("vary", "").split(","))
    unkeyed = [name for name in varying if name and name not in keyed_headers]
    if unkeyed:
        return f"Vary: {', '.join(unkeyed)} (not in the key; see cache_vary_headers)"
    streamed = header.get("content-type", "").split(";", 1)[0].strip().lower() == "text/event-stream"
    if streamed and not whole_stream:
        return "streamed (text/event-stream), not recorded whole"
    if content_length > max_entry_size:
        return f"{content_length} bytes, over the entry size limit of {max_entry_size}"
    lifetime = response_lifetime(header.get("cache-control"), float("inf"))
    if lifetime <= 0:
        return "Cache-Control: max-age=0"
    return None


def response_lifetime(cache_control: str | None, ttl: float) -> float:
    """How long a response may be served: the TTL, shortened by `s-maxage` (else `max-age`)."""
    directives = parse_cache_control(cache_control)
    for name in ("s-maxage", "max-age"):
        if name in directives:
            seconds = _seconds(directives[name])
            if seconds is not None:
                return min(ttl, seconds)
    return ttl


class Usability(enum.Enum):
    FRESH = "fresh"  # may be served as a hit
    STALE = "stale"  # too old for a hit, but may stand in when the upstream fails
    UNUSABLE = "unusable"  # another deployment version, or past the stale-if-error window


def usability(
    entry: Entry,
    *,
    now: float,
    lifetime: float,
    max_age: float | None,
    stale_if_error: float,
    current_version: str | None,
) -> Usability:
    """How `entry` may be used now, given its lifetime, the request's max-age and the current version."""
    if entry.model_version != current_version:
        return Usability.UNUSABLE  # never serve what another deployment computed, not even as stale
    age = max(now - entry.stored_at, 0.0)
    if age <= lifetime and (max_age is None or age <= max_age):
        return Usability.FRESH
    if age <= lifetime + stale_if_error:
        return Usability.STALE
    return Usability.UNUSABLE


def age_header(entry: Entry, now: float) -> str:
    """The `Age` header value: whole seconds since the entry was stored."""
    return str(max(int(now - entry.stored_at), 0))
