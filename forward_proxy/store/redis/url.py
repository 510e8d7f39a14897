"""A `--cache-backend` Redis URL: its forms, what is wrong with a bad one, and the client it names.

    redis://[user:pass@]host:port/db              one server (db 0 when left out)
    rediss://[user:pass@]host:port/db             the same over TLS
    unix:///run/redis/redis.sock?db=0             a local socket
    redis+cluster://[user:pass@]host:port         Redis Cluster, found from any node (rediss+cluster:// TLS)
    redis+sentinel://[user:pass@]host:port[,host:port...]/service/db
                                                  the master that Sentinel names `service`
                                                  (rediss+sentinel:// for TLS)

Query parameters: `prefix` (of every key, default `fp:`, so several caches can share one Redis),
`retry_interval` (seconds a failed Redis is left alone before the next try, default 1), and redis-py's own
connection parameters (`socket_timeout`, `socket_connect_timeout`, `ssl_ca_certs`, `ssl_cert_reqs`,
`ssl_certfile`, `ssl_keyfile`, ...); for Sentinel also `sentinel_username` and `sentinel_password`.
A password never leaves this module unmasked: `RedisTarget.display` is what logs and errors show.

>>> target = parse_redis_url("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/1")
>>> target.kind, target.sentinels, target.service, target.db, target.display
('sentinel', (('s1', 26379), ('s2', 26379)), 'mymaster', 1, 'redis+sentinel://:***@s1:26379,s2:26379/mymaster/1')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

DEFAULT_PREFIX = "fp:"
DEFAULT_RETRY_INTERVAL = 1.0
# Short enough that a dead Redis costs a request milliseconds; `socket_timeout` also bounds a hung server.
DEFAULT_CONNECTION: dict[str, Any] = {"socket_connect_timeout": 0.25, "socket_timeout": 0.5}
SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel")
_OWN_PARAMETERS = ("prefix", "retry_interval")
_SENTINEL_PARAMETERS: dict[str, Callable[[str], Any]] = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "ssl_ca_certs": str,
    "ssl_cert_reqs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": lambda value: value.lower() in ("1", "true", "yes"),
    "sentinel_username": str,
    "sentinel_password": str,
}


def is_redis_url(text: str) -> bool:
    return text.split("://", 1)[0].lower() in SCHEMES and "://" in text


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `--cache-backend` Redis URL: what to connect to and how."""

    kind: Literal["server", "cluster", "sentinel"]
    url: str  # for redis-py (server, cluster): the URL without this module's own parameters
    display: str  # the URL with its password masked, for logs
    prefix: str = DEFAULT_PREFIX
    retry_interval: float = DEFAULT_RETRY_INTERVAL
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # sentinel: connection options from the query

    def connect(self) -> Any:
        """A redis-py client (Redis or RedisCluster); a cluster client contacts a node at once."""
        settings = {**DEFAULT_CONNECTION, "retry": Retry(NoBackoff(), 1)}
        if self.kind == "server":
            return redis.Redis.from_url(self.url, **settings)
        if self.kind == "cluster":
            return redis.cluster.RedisCluster.from_url(self.url, **settings)
        options = {**settings, **self.options}
        sentinel_settings = {
            name: options.pop(name) for name in ("sentinel_username", "sentinel_password") if name in options
        }
        sentinel_options = {k: v for k, v in options.items() if k.startswith(("socket_", "ssl"))}
        sentinel_options.update({key.removeprefix("sentinel_"): v for key, v in sentinel_settings.items()})
        sentinel = redis.sentinel.Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_options, **options)
        return sentinel.master_for(self.service, db=self.db)


def parse_redis_url(url: str) -> RedisTarget:
    """Check a Redis URL of any supported form; `ValueError` says what is wrong and what to write."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(
            f"{_mask(url)!r} is not a Redis URL: write redis://[user:pass@]host:port/db, rediss://..., "
            "unix:///path/redis.sock, redis+cluster://host:port or redis+sentinel://host:port/service/db"
        )
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {name: value for name, value in query if name in _OWN_PARAMETERS}
    rest = [(name, value) for name, value in query if name not in _OWN_PARAMETERS]
    prefix = own.get("prefix", DEFAULT_PREFIX)
    try:
        retry_interval = float(own.get("retry_interval", DEFAULT_RETRY_INTERVAL))
    except ValueError:
        raise ValueError(f"retry_interval={own['retry_interval']!r} is not a number of seconds") from None
    if retry_interval < 0:
        raise ValueError("retry_interval must be 0 or more seconds")
    display = _mask(url)
    common: dict[str, Any] = {"display": display, "prefix": prefix, "retry_interval": retry_interval}
    if scheme.endswith("+sentinel"):
        return _parse_sentinel(parts.netloc, parts.path, rest, scheme.startswith("rediss"), common)
    base_scheme = scheme.removesuffix("+cluster")
    plain = _join(base_scheme, parts.netloc, parts.path, urlencode(rest))
    try:
        redis.connection.parse_url(plain)  # checks ports and query parameters
    except ValueError as exc:
        raise ValueError(f"{display}: {exc}") from None
    if base_scheme != "unix" and not parts.hostname:
        raise ValueError(f"{display} names no host: write {base_scheme}://host:port/db")
    kind: Literal["server", "cluster"] = "cluster" if scheme.endswith("+cluster") else "server"
    return RedisTarget(kind, plain, **common)


def _parse_sentinel(
    netloc: str, path: str, query: list[tuple[str, str]], tls: bool, common: dict[str, Any]
) -> RedisTarget:
    example = "redis+sentinel://host:26379[,host:26379]/service/db"
    userinfo, _, hosts = netloc.rpartition("@")
    sentinels = []
    for address in filter(None, hosts.split(",")):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{common['display']}: sentinel {address!r} needs host:port, as in {example}")
        sentinels.append((host.strip("[]"), int(port)))
    segments = [unquote(segment) for segment in path.split("/") if segment]
    if not sentinels or not segments or len(segments) > 2:
        raise ValueError(f"{common['display']}: write {example}")
    if len(segments) == 2 and not segments[1].isdigit():
        raise ValueError(f"{common['display']}: the database {segments[1]!r} is not a number")
    options: dict[str, Any] = {}
    for name, value in query:
        parse = _SENTINEL_PARAMETERS.get(name)
        if parse is None:
            known = ", ".join(sorted(_SENTINEL_PARAMETERS))
            raise ValueError(f"{common['display']}: unknown parameter {name!r} (known: {known})")
        try:
            options[name] = parse(value)
        except ValueError:
            raise ValueError(f"{common['display']}: {name}={value!r} is not valid") from None
    if userinfo:
        username, _, password = userinfo.partition(":")
        if username:
            options["username"] = unquote(username)
        if password:
            options["password"] = unquote(password)
    if tls:
        options["ssl"] = True
    return RedisTarget(
        "sentinel",
        "",
        sentinels=tuple(sentinels),
        service=segments[0],
        db=int(segments[1]) if len(segments) == 2 else 0,
        options=options,
        **common,
    )


def _mask(url: str) -> str:
    """The URL with the password (and `*_password` query values) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = [
        (name, "***" if name.endswith("password") else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return _join(parts.scheme, netloc, parts.path, urlencode(query, safe="*:/,"))


def _join(scheme: str, netloc: str, path: str, query: str) -> str:
    """`urlunsplit` without its habit of dropping the `//` of an empty host (unix:///path)."""
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")
