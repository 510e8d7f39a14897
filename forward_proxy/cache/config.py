"""The cache's mitmproxy options (one table, the single source of truth) and their validated form.

`OPTIONS` is registered by the cache addon with `loader.add_option`, so `forward-proxy run --set NAME=VALUE`,
`mitmdump -s forward_proxy/addons.py --set NAME=VALUE` and `forward-proxy run --options` all see the same
names, defaults and help texts. `CacheConfig.from_options` turns the raw option values into checked,
typed settings and raises `ValueError` with a sentence a user can act on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from forward_proxy.cache.rules import DEFAULT_RULES, Rules
from forward_proxy.cache.units import format_duration, format_size, parse_duration, parse_size
from forward_proxy.store.backend import check_backend
from forward_proxy.store.redis import parse_redis_url


def default_cache_dir() -> Path:
    """`$FORWARD_PROXY_CACHE_DIR`, else `$XDG_CACHE_HOME/forward-proxy`, else `~/.cache/forward-proxy`."""
    explicit = os.environ.get("FORWARD_PROXY_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "forward-proxy"


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: Any  # str, bool or Sequence[str], as mitmproxy's loader.add_option takes it
    default: Any
    help: str


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "cache_dir",
        str,
        "",
        "Directory of the response cache and its counters (created if missing). Empty: "
        "$FORWARD_PROXY_CACHE_DIR, else $XDG_CACHE_HOME/forward-proxy, else ~/.cache/forward-proxy.",
    ),
    OptionSpec(
        "cache_backend",
        str,
        "",
        "Where entries, counters and the key secret live. Empty: diskcache in cache_dir (one host). A Redis "
        "URL (redis://[user:pass@]host:port/db, rediss://..., redis+cluster://host:port, "
        "redis+sentinel://host:port/service/db) shares one cache among every proxy that names it; its size "
        "is bounded by Redis's maxmemory with an LRU policy, not cache_size (see docs/deployment.md).",
    ),
    OptionSpec(
        "cache_memory_tier",
        str,
        "0",
        "Size of an in-process memory tier in front of the backend, e.g. 64MiB: recent hits are served "
        "from memory for cache_memory_ttl, never after a purge or a version change. 0 turns it off.",
    ),
    OptionSpec(
        "cache_memory_ttl",
        str,
        "2s",
        "How long the memory tier keeps its copy of an entry before reading the backend again.",
    ),
    OptionSpec(
        "cache_size",
        str,
        "1GiB",
        "Size limit of the cache directory's entries, e.g. 512MiB or 2GB; least recently used entries are "
        "evicted beyond it.",
    ),
    OptionSpec(
        "cache_ttl", str, "1h", "How long an entry is served after it was stored, e.g. 90s, 30m, 1h, 1d."
    ),
    OptionSpec(
        "cache_rules",
        Sequence[str],
        list(DEFAULT_RULES),
        "Requests the cache handles, as `METHOD PATTERN`: a path glob for any origin "
        "(`POST /v2/models/*/infer`) or a URL glob for one origin (`POST http://127.0.0.1:8000/v1/*`); "
        "`*` matches within a path segment, `**` across segments. Setting it replaces the defaults; an empty "
        "list turns the cache off.",
    ),
    OptionSpec(
        "cache_ignore_fields",
        Sequence[str],
        [],
        "JSON body fields left out of the cache key, as dotted paths (`request_id`, `metadata.trace`).",
    ),
    OptionSpec(
        "cache_vary_headers",
        Sequence[str],
        [],
        "Request headers that change the answer and so belong in the key, besides Host, Content-Type and Accept.",
    ),
    OptionSpec(
        "cache_partition_headers",
        Sequence[str],
        [],
        "Credential headers that partition the cache by tenant, besides the credential headers of the common "
        "model APIs (docs/privacy.md lists them: Authorization, X-Api-Key, Api-Key, X-Goog-Api-Key, "
        "OpenAI-Organization, OpenAI-Project, Cookie, ...).",
    ),
    OptionSpec(
        "cache_partition_secret",
        str,
        "",
        "Secret for the HMAC of credentials in keys. Empty: a random secret kept in <cache_dir>/partition.key "
        "(processes sharing a cache directory share it).",
    ),
    OptionSpec(
        "per_item_cache",
        bool,
        True,
        "Cache batched inference row by row: OpenAI embedding inputs and KServe v2 tensor rows (for models "
        "whose metadata has max_batch_size > 0) are looked up one by one and only the unknown rows go "
        "upstream (X-Cache: PARTIAL, X-Cache-Rows). Off: such requests are cached whole.",
    ),
    OptionSpec(
        "max_batch_rows",
        int,
        2048,
        "Most rows a batch may have to be answered row by row (the model API's own cap is 2,048); a larger "
        "batch is forwarded and cached whole. Bounds the work one request can make the proxy do.",
    ),
    OptionSpec(
        "request_body_decoded_max",
        str,
        "16MiB",
        "Largest request body, after undoing at most one content coding, that the cache reads to build a "
        "key; a larger one (or one with two codings, a decompression bomb's shape) is forwarded untouched "
        "and not cached, and never decoded further.",
    ),
    OptionSpec(
        "only_if_cached_shared",
        bool,
        True,
        "Honour `Cache-Control: only-if-cached` for requests without credentials (the shared partition). "
        "It tells a client whether anybody asked the same recently (docs/privacy.md); false answers such "
        "requests as if the directive were not there.",
    ),
    OptionSpec(
        "cache_statuses",
        Sequence[str],
        ["200"],
        "Response status codes that are stored.",
    ),
    OptionSpec(
        "cache_max_entry_size",
        str,
        "8MiB",
        "Largest response body that is stored; larger answers are passed on uncached.",
    ),
    OptionSpec(
        "cache_max_waiters",
        int,
        1000,
        "Most identical requests that wait for one in-flight upstream call; more go upstream themselves.",
    ),
    OptionSpec(
        "stale_if_error",
        str,
        "10m",
        "How long after its TTL an entry may still be served (X-Cache: STALE) when the upstream is "
        "unreachable, times out or answers 5xx. 0 turns this off.",
    ),
    OptionSpec(
        "version_check_interval",
        str,
        "5s",
        "How old the known X-Model-Version of an origin may be before a hit re-checks it; checks run in the "
        "background while hits are served. 0 turns the re-check off (versions are then learned from "
        "responses only).",
    ),
    OptionSpec(
        "version_check_path",
        str,
        "/v2/health/live",
        "The cheap GET request used to re-check an origin's X-Model-Version.",
    ),
    OptionSpec(
        "version_header",
        str,
        "X-Model-Version",
        "Response header that carries the upstream's deployment version.",
    ),
    OptionSpec(
        "upstream_timeout",
        str,
        "60s",
        "How long the cache waits for an upstream answer to a cached route before answering 504.",
    ),
)


class OptionValues(Protocol):
    def __getattr__(self, name: str) -> Any: ...


@dataclass(frozen=True)
class CacheConfig:
    directory: Path
    size_limit: int
    ttl: float
    rules: Rules
    ignore_fields: tuple[str, ...]
    vary_headers: tuple[str, ...]
    partition_headers: tuple[str, ...]
    partition_secret: bytes | None
    statuses: frozenset[int]
    max_entry_size: int
    max_waiters: int
    stale_if_error: float
    version_check_interval: float
    version_check_path: str
    version_header: str
    upstream_timeout: float
    per_item_cache: bool = True
    backend: str = ""  # "" (diskcache in `directory`) or a Redis URL
    memory_tier: int = 0  # bytes; 0: no memory tier
    memory_ttl: float = 2.0
    max_batch_rows: int = 2048
    request_body_decoded_max: int = 16 * 1024 * 1024
    only_if_cached_shared: bool = True

    @classmethod
    def from_options(cls, options: OptionValues) -> CacheConfig:
        """Validate raw option values; a `ValueError` names the option and what to write instead."""

        def checked(name: str, parse: Any) -> Any:
            try:
                return parse(getattr(options, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None

        ttl = checked("cache_ttl", parse_duration)
        if ttl <= 0:
            raise ValueError(
                "cache_ttl: must be more than 0 (to turn the cache off, set cache_rules to nothing)"
            )
        timeout = checked("upstream_timeout", parse_duration)
        if timeout <= 0:
            raise ValueError("upstream_timeout: must be more than 0, e.g. 60s")
        if options.cache_max_waiters < 0:
            raise ValueError("cache_max_waiters: must be 0 or more")
        if options.max_batch_rows < 1:
            raise ValueError("max_batch_rows: must be 1 or more (per_item_cache=false turns rows off)")
        path = options.version_check_path
        backend = options.cache_backend.strip()
        checked("cache_backend", lambda spec: check_backend(spec))
        memory_ttl = checked("cache_memory_ttl", parse_duration)
        if memory_ttl <= 0:
            raise ValueError("cache_memory_ttl: must be more than 0, e.g. 2s")
        if not path.startswith("/"):
            raise ValueError(f"version_check_path: {path!r} must be a path starting with /")
        return cls(
            directory=Path(options.cache_dir).expanduser() if options.cache_dir else default_cache_dir(),
            size_limit=checked("cache_size", parse_size),
            ttl=ttl,
            rules=checked("cache_rules", Rules.parse),
            ignore_fields=tuple(options.cache_ignore_fields),
            vary_headers=tuple(name.lower() for name in options.cache_vary_headers),
            partition_headers=tuple(name.lower() for name in options.cache_partition_headers),
            partition_secret=options.cache_partition_secret.encode() or None,
            statuses=checked("cache_statuses", _statuses),
            max_entry_size=checked("cache_max_entry_size", parse_size),
            max_waiters=options.cache_max_waiters,
            stale_if_error=checked("stale_if_error", parse_duration),
            version_check_interval=checked("version_check_interval", parse_duration),
            version_check_path=path,
            version_header=options.version_header,
            upstream_timeout=timeout,
            per_item_cache=bool(options.per_item_cache),
            backend=backend,
            memory_tier=checked("cache_memory_tier", parse_size),
            memory_ttl=memory_ttl,
            max_batch_rows=options.max_batch_rows,
            request_body_decoded_max=checked("request_body_decoded_max", parse_size),
            only_if_cached_shared=bool(options.only_if_cached_shared),
        )

    def describe(self) -> str:
        """`/path, 1.0 GiB, ttl 1h`, for the launcher's start-up line."""
        where = (
            parse_redis_url(self.backend).display
            if self.backend
            else f"{self.directory}, {format_size(self.size_limit)}"
        )
        if self.memory_tier:
            where += f", memory tier {format_size(self.memory_tier)} for {format_duration(self.memory_ttl)}"
        return f"{where}, ttl {format_duration(self.ttl)}"


def _statuses(values: Sequence[str]) -> frozenset[int]:
    codes = set()
    for value in values:
        if not value.strip().isdigit() or not 100 <= int(value) <= 599:
            raise ValueError(f"{value!r} is not an HTTP status code such as 200")
        codes.add(int(value))
    return frozenset(codes)
