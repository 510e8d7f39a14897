"""The cache addon: mitmproxy hooks that tie the pure cache parts together.

For a request that a cache rule matches, the `request` hook (async, so a flow can wait without holding
up others) decides and answers it:

    HIT        a fresh entry of the upstream's current version, served from the store
    MISS       fetched from the upstream (by this flow, for every identical request in flight) and stored
    REFRESH    `Cache-Control: no-cache`: fetched and stored without looking up
    BYPASS     `no-store` or a streamed request: fetched, never stored
    COALESCED  an identical request was already upstream; this flow got its answer
    STALE      the upstream failed and an entry within the stale-if-error window stood in

It sets `X-Cache`, `X-Cache-Key` and (when served from the store) `Age`, and records its decision in
`flow.metadata` for the statistics addons (`fp.cache`, `fp.key_id`, `fp.route`, `fp.origin`, `fp.model`,
`fp.upstream_seconds`). Requests no rule matches are left to mitmproxy untouched; their responses only
teach the cache the upstream's current deployment version.

A failing store never fails a request: the flow is forwarded uncached, the failure logged and counted.

The store is the backend `cache_backend` names (`forward_proxy.store.backend`): diskcache in the cache
directory, or a Redis shared by a fleet of proxies. With Redis, the one upstream call a process would make
for a key is also coalesced across processes and hosts (`forward_proxy.store.locks.FleetFlight`): a
request that another proxy is already computing waits for that proxy's stored answer (COALESCED).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mitmproxy import ctx, exceptions, http

from forward_proxy.cache.canonical import canonical_body, canonical_query
from forward_proxy.cache.config import OPTIONS, CacheConfig
from forward_proxy.cache.keys import (
    KEY_HEADERS,
    NAMESPACE_HEADER,
    PARTITION_HEADERS,
    KeyParts,
    cache_key,
    key_headers,
    key_id,
    partition,
)
from forward_proxy.cache.peritem import ROWS_HEADER, BatchRequest, RowCache, RowSettings, RowsOutcome
from forward_proxy.cache.policy import (
    RequestDirectives,
    Usability,
    age_header,
    opaque_server_error,
    request_directives,
    response_lifetime,
    unparsable_json,
    unstorable_reason,
    usability,
)
from forward_proxy.cache.rows import Batch, protocol_of, split_embeddings, split_inference
from forward_proxy.cache.rules import Rule, model_from_path
from forward_proxy.cache.singleflight import Role, SingleFlight
from forward_proxy.cache.upstream import UpstreamClient, UpstreamError, UpstreamResponse, request_problem
from forward_proxy.cache.versions import Knowledge, VersionBook
from forward_proxy.errors import error_response
from forward_proxy.stats.counters import Counters
from forward_proxy.store.backend import Backend, open_backend
from forward_proxy.store.base import CacheStore, Entry, StoreError
from forward_proxy.store.locks import FleetFlight, Turn
from forward_proxy.store.memory import MemoryCounterStore

logger = logging.getLogger(__name__)

COUNTER_FLUSH_SECONDS = 0.25
STORE_FLUSH_SECONDS = 1.0
VERSION_CHECK_TIMEOUT = 5.0
STORE_ERROR_LOG_SECONDS = 60.0
SECRET_RETRY_SECONDS = 2.0
# Headers of an upstream answer that describe one response on the wire, not the stored answer.
_NOT_STORED = frozenset({"age", "x-cache", "x-cache-key", "content-length"})
_DECISION_COUNTER = {
    "HIT": "hits",
    "MISS": "misses",
    "BYPASS": "bypasses",
    "REFRESH": "refreshes",
    "COALESCED": "coalesced",
    "STALE": "stale",
    "PARTIAL": "partials",  # the report adds them to `misses` (they went upstream too)
}


@dataclass
class _Handling:
    """What the cache knows about one flow it handles."""

    flow: http.HTTPFlow
    rule: Rule
    origin: str
    model: str | None
    directives: RequestDirectives
    parts: KeyParts | None = None
    key: str = ""
    key_id: str = ""
    stale: Entry | None = None  # an entry that may stand in if the upstream fails
    store_failed: bool = False  # the store failed for this flow already: not asked again for its rows


@dataclass(frozen=True)
class _Fetched:
    response: UpstreamResponse
    version: str | None
    key: str  # the key under the version that computed the answer
    key_id: str
    from_fleet: bool = False  # another proxy computed and stored it (fleet single flight)


class Cache:
    def __init__(self) -> None:
        self.config: CacheConfig | None = None
        self.store: CacheStore | None = None
        self.backend: Backend | None = None
        self.flight: FleetFlight[Any] | None = None  # across processes and hosts (Redis)
        self.counters = Counters(MemoryCounterStore())
        self.versions = VersionBook(interval=5.0)
        self.client = UpstreamClient()
        self._flights = SingleFlight[_Fetched](max_waiters=1000)
        self._checks = SingleFlight[bool](max_waiters=1_000_000)
        self.rows = RowCache()
        self._batch_flights = SingleFlight[RowsOutcome](max_waiters=1000)
        self._secret = os.urandom(32)
        self._secret_shared = False  # False: this process's own secret, until the backend's can be read
        self._secret_tried_at = float("-inf")
        self._opened: tuple[Any, ...] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._store_error_logged_at = float("-inf")
        self._version_check_warned: set[str] = set()

    # --- configuration -------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        for option in OPTIONS:
            loader.add_option(option.name, option.type, option.default, option.help)

    def configure(self, updated: set[str]) -> None:
        try:
            config = CacheConfig.from_options(ctx.options)
        except ValueError as exc:
            raise exceptions.OptionsError(str(exc)) from None
        self.config = config
        self.versions.interval = config.version_check_interval
        self._flights.max_waiters = config.max_waiters
        self._batch_flights.max_waiters = self.rows.flight.max_waiters = config.max_waiters
        self.client.verify_tls = not ctx.options.ssl_insecure
        if self._opened is not None:  # already running: follow a changed directory, size or secret
            self._open(config)

    def running(self) -> None:
        if self.config is not None:
            self._open(self.config)
        task = asyncio.ensure_future(self._flush_store_forever())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush_store_forever(self) -> None:
        """Every second, off the event loop: the store's buffered bookkeeping (LRU access times) and its
        eviction to the size limit (`DiskStore.flush`)."""
        while True:
            await asyncio.sleep(STORE_FLUSH_SECONDS)
            flush = getattr(self.store, "flush", None)
            if flush is None:
                continue
            try:
                evicted = await asyncio.to_thread(flush)
            except StoreError as exc:
                logger.debug(f"cache store flush failed: {exc}")
                continue
            if isinstance(evicted, int) and evicted:
                self.counters.count("evictions", origin="", route="", model=None, amount=evicted)

    async def settled(self) -> None:
        """Wait until no upstream call or store write is in flight."""
        await self._flights.drain()
        await self._batch_flights.drain()

    def done(self) -> None:
        for task in self._background:
            task.cancel()
        self.counters.close()
        if self.store is not None:
            self.store.close()
        self.client.close()

    def _open(self, config: CacheConfig) -> None:
        wanted = (
            config.directory,
            config.size_limit,
            config.partition_secret,
            config.backend,
            config.memory_tier,
            config.memory_ttl,
        )
        if wanted == self._opened:
            return
        self._opened = wanted
        self.counters.close()
        if self.store is not None:
            self.store.close()
            self.store = self.backend = self.flight = None
        try:
            self.backend = open_backend(
                config.backend,
                config.directory,
                config.size_limit,
                memory_tier=config.memory_tier,
                memory_ttl=config.memory_ttl,
            )
        except StoreError as exc:
            logger.warning(  # not an error: the proxy serves on without the cache
                f"cache store unavailable, requests are forwarded uncached: {exc}. "
                "Check that the cache directory is writable, or choose another with --cache-dir."
            )
            self.counters = Counters(MemoryCounterStore())
        else:
            self.store, self.flight = self.backend.entries, self.backend.flight
            self.counters = Counters(self.backend.counters, flush_interval=COUNTER_FLUSH_SECONDS)
        self._secret_shared = config.partition_secret is not None
        if config.partition_secret is not None:
            self._secret = config.partition_secret
        else:
            self._secret_tried_at = float("-inf")
            self._load_shared_secret(warn=True)

    def _load_shared_secret(self, *, warn: bool = False) -> None:
        """The key secret every process on the backend shares; until it can be read (Redis down at start),
        a secret of this process only, and another try at most every few seconds."""
        now = time.monotonic()
        if self.backend is None or now - self._secret_tried_at < SECRET_RETRY_SECONDS:
            return
        self._secret_tried_at = now
        try:
            self._secret = self.backend.partition_secret()
        except StoreError as exc:
            if warn:
                logger.warning(
                    f"using a secret for this process only ({exc}); other processes will not share keys "
                    "until the backend can be read"
                )
            return
        if not warn:
            logger.warning("read the shared key secret of the backend: entries are shared again")
        self._secret_shared = True

    # --- hooks ---------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        config = self.config
        if config is None or flow.response is not None or flow.error is not None:
            return
        request = flow.request
        path, _, query = request.path.partition("?")
        rule = config.rules.match(request.method, request.scheme, request.host, request.port, path)
        if rule is None:
            return
        origin = f"{request.scheme}://{request.host}:{request.port}"
        flow.metadata["fp.route"] = rule.label
        flow.metadata["fp.origin"] = origin
        headers = _header_map(request.headers.fields)
        raw = request.raw_content
        accept = headers.get("accept", "")
        if raw is None or "text/event-stream" in accept:
            # A streamed request or answer: mitmproxy forwards it as it is.
            self._decide(_Handling(flow, rule, origin, model_from_path(path), RequestDirectives()), "BYPASS")
            return

        body = canonical_body(
            raw, headers.get("content-type"), headers.get("content-encoding"), config.ignore_fields
        )
        document = body.document
        model = document.get("model") if isinstance(document, dict) else None
        handling = _Handling(
            flow,
            rule,
            origin,
            model if isinstance(model, str) else model_from_path(path),
            request_directives(headers.get("cache-control"), headers.get("pragma")),
        )
        if isinstance(document, dict) and document.get("stream") is True:
            self._decide(handling, "BYPASS")
            return
        if not self._secret_shared:
            self._load_shared_secret()
        namespace = headers.get(NAMESPACE_HEADER, "")
        if NAMESPACE_HEADER in headers:
            del request.headers[NAMESPACE_HEADER]  # a proxy control header, not for the upstream

        confirmed = True
        directives = handling.directives
        if (
            not directives.only_if_cached
            and not directives.no_store
            and self.versions.state(origin, time.time()) is Knowledge.EXPIRED
        ):
            confirmed = await self._check_version(request.scheme, request.host, request.port, origin)
        handling.parts = KeyParts(
            method=request.method,
            scheme=request.scheme,
            host=request.host,
            port=request.port,
            path=path,
            query=canonical_query(query),
            body=body.data,
            headers=key_headers(headers.get, config.vary_headers),
            partition=partition(headers.get, config.partition_headers, self._secret),
            namespace=namespace,
            version=self.versions.current(origin),
        )
        handling.key = cache_key(handling.parts, self._secret)
        handling.key_id = key_id(handling.key)
        flow.metadata["fp.key_id"] = handling.key_id
        where = (request.scheme, request.host, request.port, request.method, request.path)
        problem = request_problem(*where, request.headers.fields, raw)
        if problem is not None:  # refused before it could join (and fail) an identical request in flight
            self._answer_failure(handling, "BYPASS", problem)
            return

        if directives.no_store:
            await self._fetch_and_answer(handling, "BYPASS", share=False)
            return
        if not directives.no_cache:
            entry = self._lookup(handling)
            if entry is not None:
                now = time.time()
                use = usability(
                    entry,
                    now=now,
                    lifetime=response_lifetime(_header(entry, "cache-control"), config.ttl),
                    max_age=directives.max_age,
                    stale_if_error=config.stale_if_error,
                    current_version=handling.parts.version,
                )
                if use is Usability.FRESH and (confirmed or directives.only_if_cached):
                    self._answer_from_entry(handling, entry, "HIT", now)
                    if self.versions.state(origin, now) is Knowledge.DUE:
                        self._check_version_in_background(request.scheme, request.host, request.port, origin)
                    return
                if use is not Usability.UNUSABLE:
                    handling.stale = entry
        if config.per_item_cache and (batch := await self._batch(handling, document)) is not None:
            await self._answer_rows(handling, batch, confirmed)
            return
        if directives.only_if_cached:
            flow.response = self._error(
                handling,
                "MISS",
                504,
                "not_cached",
                "No cached answer for this request, and `Cache-Control: only-if-cached` forbids asking the "
                "upstream. Send the request without only-if-cached to have it computed.",
            )
            self._decide(handling, "MISS")
            return
        await self._fetch_and_answer(handling, "REFRESH" if directives.no_cache else "MISS", share=True)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if (
            flow.response is not None
            and flow.metadata.get("fp.cache") == "BYPASS"
            and "x-cache" not in flow.response.headers
        ):
            flow.response.headers["x-cache"] = "BYPASS"  # a streamed exchange mitmproxy forwards itself

    def response(self, flow: http.HTTPFlow) -> None:
        """Learn the upstream's version from answers mitmproxy forwarded (the cache's own fetches teach it
        directly)."""
        if (
            flow.response is None
            or flow.metadata.get("fp.cache") not in (None, "BYPASS")
            or self.config is None
        ):
            return
        version = flow.response.headers.get(self.config.version_header)
        if version is not None and flow.server_conn.timestamp_start is not None:
            request = flow.request
            self.versions.learn(f"{request.scheme}://{request.host}:{request.port}", version, time.time())

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("fp.cache") == "BYPASS" and "fp.route" in flow.metadata:
            self._count_for(flow, "upstream_errors")

    # --- deciding and answering ----------------------------------------------------------------

    def _lookup(self, handling: _Handling) -> Entry | None:
        if self.store is None:
            self._store_failed(handling, "the cache store could not be opened")
            return None
        try:
            return self.store.get(handling.key)
        except StoreError as exc:
            self._store_failed(handling, str(exc))
            return None

    async def _fetch_and_answer(self, handling: _Handling, decision: str, *, share: bool) -> None:
        assert self.config is not None
        flow = handling.flow

        async def fetch() -> _Fetched:
            return await self._fetch(handling)

        async def store(fetched: _Fetched) -> None:
            await self._store(handling, fetched)

        try:
            if share and self.flight is not None:
                fetched, role = await self._flights.run(
                    handling.key,
                    lambda: self._fetch_for_fleet(handling),
                    timeout=self.config.upstream_timeout,
                )
            elif share:
                fetched, role = await self._flights.run(
                    handling.key, fetch, timeout=self.config.upstream_timeout, after=store
                )
            else:
                fetched, role = await fetch(), Role.LEADER
        except UpstreamError as exc:
            self._answer_failure(handling, decision, exc)
            return
        except TimeoutError:
            failure = UpstreamError("timeout", f"no answer within {self.config.upstream_timeout:g}s")
            self._answer_failure(handling, "COALESCED", failure)
            return
        response = fetched.response
        if role is Role.WAITER or fetched.from_fleet:
            decision = "COALESCED"
        if response.status_code >= 500 and handling.stale is not None:
            self._answer_from_entry(handling, handling.stale, "STALE", time.time())
            return
        handling.key, handling.key_id = fetched.key, fetched.key_id
        flow.metadata["fp.key_id"] = fetched.key_id
        flow.metadata["fp.upstream_seconds"] = response.seconds
        if self._answer_opaque_server_error(
            handling, decision, response.status_code, response.headers, response.content
        ):
            return
        fields = [(name, value) for name, value in response.headers]
        fields += _cache_headers(decision, fetched.key_id, None)
        fields.append((b"content-length", str(len(response.content)).encode()))
        flow.response = _response(response.status_code, response.reason, fields, response.content)
        self._decide(handling, decision)

    async def _fetch(self, handling: _Handling) -> _Fetched:
        """One upstream call for `handling`'s request (run once per key in flight)."""
        assert self.config is not None and handling.parts is not None
        request = handling.flow.request
        try:
            response = await self.client.request(
                request.scheme,
                request.host,
                request.port,
                request.method,
                request.path,
                request.headers.fields,
                request.raw_content or b"",
                self.config.upstream_timeout,
                server_name=request.pretty_host,
            )
        except UpstreamError as exc:
            if exc.kind != "invalid_request":  # the client's fault: the upstream was not asked
                self._count(handling, "upstream_errors")
            raise
        self._count(handling, "upstream_seconds", response.seconds)
        if response.status_code >= 500:
            self._count(handling, "upstream_errors")
        version_bytes = response.header(self.config.version_header.lower().encode())
        version = version_bytes.decode("latin-1") if version_bytes is not None else handling.parts.version
        if version_bytes is not None:
            self.versions.learn(handling.origin, version, time.time())
        if version == handling.parts.version:
            return _Fetched(response, version, handling.key, handling.key_id)
        key = cache_key(dataclasses.replace(handling.parts, version=version), self._secret)
        return _Fetched(response, version, key, key_id(key))

    async def _fetch_for_fleet(self, handling: _Handling) -> _Fetched:
        """The one upstream call of the fleet for `handling`'s key: this proxy makes it and stores the answer
        (under a Redis lease), or it waits for the answer another proxy is computing and stores."""
        assert self.config is not None and self.flight is not None
        started = time.time()
        store = self.store

        def lookup() -> _Fetched | None:
            entry = store.get(handling.key) if store is not None else None
            if entry is None or entry.stored_at < started:  # an older entry is what REFRESH replaces
                return None
            fields = tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in entry.headers)
            response = UpstreamResponse(entry.status_code, b"", fields, entry.content, 0.0)
            return _Fetched(response, entry.model_version, handling.key, entry.key_id, from_fleet=True)

        async def publish(fetched: _Fetched) -> bool:
            return await self._store(handling, fetched) and fetched.key == handling.key

        fetched, _ = await self.flight.run(
            handling.key,
            lambda: self._fetch(handling),
            publish,
            lookup,
            wait=self.config.upstream_timeout,
        )
        return fetched

    async def _store(self, handling: _Handling, fetched: _Fetched) -> bool:
        """Store a fetched answer when the policy allows (run once per upstream call); whether it was."""
        config = self.config
        assert config is not None
        response = fetched.response
        header = {name.decode("latin-1"): value.decode("latin-1") for name, value in response.headers}
        keyed = (*KEY_HEADERS, *PARTITION_HEADERS, *config.vary_headers, *config.partition_headers)
        reason = unstorable_reason(
            response.status_code, header, len(response.content), config.statuses, config.max_entry_size, keyed
        )
        if reason is None and unparsable_json(header, response.content):
            reason = "a JSON answer whose body does not parse"
        if reason is not None:
            logger.debug(f"not stored ({reason}): {handling.rule.label} {handling.key_id}")
            return False
        if self.store is None:
            return False  # already counted as a store error by the lookup
        request = handling.flow.request
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in response.headers
            if name.decode("latin-1") not in _NOT_STORED
        )
        entry = Entry(
            status_code=response.status_code,
            headers=headers,
            content=response.content,
            stored_at=time.time(),
            upstream_seconds=response.seconds,
            model_version=fetched.version,
            origin=handling.origin,
            route=handling.rule.label,
            model=handling.model,
            method=request.method,
            path=request.path,
            key_id=fetched.key_id,
            size=len(response.content) + sum(len(name) + len(value) + 4 for name, value in headers),
        )
        expire = response_lifetime(header.get("cache-control"), config.ttl) + config.stale_if_error
        # One SQLite transaction (~0.1 ms) costs less on the event loop than a hand-off to a thread, but
        # let the flows waiting for this answer send it first.
        await asyncio.sleep(0)
        try:
            evicted = self.store.set(fetched.key, entry, expire)
        except StoreError as exc:
            self._store_failed(handling, str(exc))
            return False
        self._count(handling, "stores")
        if evicted:
            self.counters.count("evictions", origin="", route="", model=None, amount=evicted)
        return True

    def _answer_from_entry(self, handling: _Handling, entry: Entry, decision: str, now: float) -> None:
        fields = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in entry.headers]
        fields += _cache_headers(decision, entry.key_id, age_header(entry, now))
        fields.append((b"content-length", str(len(entry.content)).encode()))
        handling.flow.response = _response(entry.status_code, b"", fields, entry.content)
        handling.flow.metadata["fp.key_id"] = entry.key_id
        handling.flow.metadata["fp.upstream_seconds"] = entry.upstream_seconds
        self._decide(handling, decision)
        self._count(handling, "bytes_served_from_cache", len(entry.content))
        self._count(handling, "upstream_seconds_saved", entry.upstream_seconds)

    def _answer_failure(self, handling: _Handling, decision: str, failure: UpstreamError) -> None:
        if failure.kind == "invalid_request":
            message = f"The proxy cannot forward this request: {failure.message}. Fix the request's headers."
            handling.flow.response = self._error(handling, decision, 400, "invalid_request", message)
            self._decide(handling, decision)
            return
        if handling.stale is not None:
            logger.info(f"serving a stale entry for {handling.origin}: {failure.message}")
            self._answer_from_entry(handling, handling.stale, "STALE", time.time())
            return
        if failure.kind == "timeout":
            status, code, advice = 504, "upstream_timeout", "Retry later, or raise upstream_timeout."
        elif failure.kind == "unreachable":
            status, code, advice = (
                502,
                "upstream_unreachable",
                "Check that the upstream is running and reachable.",
            )
        else:
            status, code, advice = 502, "upstream_failed", "Check the upstream's logs; retry later."
        message = f"The upstream {handling.origin} did not answer: {failure.message}. {advice}"
        handling.flow.response = self._error(handling, decision, status, code, message, cause=failure.message)
        self._decide(handling, decision)

    def _answer_opaque_server_error(
        self,
        handling: _Handling,
        decision: str,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        content: bytes,
    ) -> bool:
        """Answer an upstream 5xx without a JSON body as a 502 in the proxy's error shape; whether it did."""
        if status < 500:  # every successful answer passes here: decode no headers for it
            return False
        header = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers}
        if not opaque_server_error(status, header, content):
            return False
        media = header.get("content-type") or "no Content-Type"
        cause = f"it answered {status} with {media}, not a JSON error"
        message = f"The upstream {handling.origin} failed: {cause}. Check the upstream's logs; retry later."
        handling.flow.response = self._error(
            handling, decision, 502, "upstream_error", message, cause=cause, upstream_status=status
        )
        self._decide(handling, decision)
        return True

    def _error(
        self, handling: _Handling, decision: str, status: int, code: str, message: str, **extra: Any
    ) -> http.Response:
        headers = {"x-cache": decision, "x-cache-key": handling.key_id}
        return error_response(status, code, message, headers=headers, upstream=handling.origin, **extra)

    def _decide(self, handling: _Handling, decision: str) -> None:
        flow = handling.flow
        flow.metadata["fp.cache"] = decision
        if handling.model is not None:
            flow.metadata["fp.model"] = handling.model
        self._count(handling, "requests")
        self._count(handling, _DECISION_COUNTER[decision])

    # --- per-item caching of batches (peritem.py) ----------------------------------------------

    async def _batch(self, handling: _Handling, document: Any) -> Batch | None:
        """The request's rows when it is a batch the cache may answer row by row, else None."""
        assert self.config is not None and handling.parts is not None
        protocol = protocol_of(handling.parts.path)
        if protocol == "openai-embeddings":
            return split_embeddings(document, self.config.ignore_fields)
        if protocol == "kserve-v2-infer":
            batch = split_inference(document, self.config.ignore_fields)
            request = handling.flow.request
            if batch is not None and await self.rows.model_batches(
                self.client,
                handling.parts,
                request.headers.fields,
                request.pretty_host,
                upstream_timeout=self.config.upstream_timeout,
            ):
                return batch
        return None

    async def _answer_rows(self, handling: _Handling, batch: Batch, confirmed: bool) -> None:
        """Answer a batch row by row; identical batches in flight share one answer (COALESCED)."""
        config = self.config
        assert config is not None and handling.parts is not None
        request = handling.flow.request
        batch_request = BatchRequest(
            batch=batch,
            parts=handling.parts,
            directives=handling.directives,
            confirmed=confirmed,
            origin=handling.origin,
            route=handling.rule.label,
            model=handling.model,
            server_name=request.pretty_host,
            headers=tuple(request.headers.fields),
            raw_body=request.raw_content or b"",
        )
        settings = RowSettings(
            ttl=config.ttl,
            stale_if_error=config.stale_if_error,
            statuses=config.statuses,
            max_entry_size=config.max_entry_size,
            upstream_timeout=config.upstream_timeout,
            version_header=config.version_header,
        )

        async def compute() -> RowsOutcome:
            store = None if handling.store_failed else self.store
            outcome = await self.rows.answer(
                batch_request, store=store, client=self.client, secret=self._secret, settings=settings
            )
            await self._after_rows(handling, outcome)
            return outcome

        async def compute_in_fleet() -> RowsOutcome:
            """With Redis: a batch with rows not yet cached is computed once for the whole fleet; another
            proxy that asks meanwhile waits until the answer is stored (its rows, or the whole answer of an
            upstream that does not answer in rows), then answers from the store."""
            fleet, parts, store = self.flight, handling.parts, self.store
            assert parts is not None
            if (
                fleet is None
                or store is None
                or handling.store_failed
                or handling.directives.only_if_cached
                or await asyncio.to_thread(self._rows_stored, batch, parts, time.time() - config.ttl)
            ):
                return await compute()
            started = time.time()

            def stored() -> bool | Entry | None:
                """True when the rows are stored, the whole answer when that is, else None (blocking)."""
                if self._rows_stored(batch, parts, started):
                    return True
                entry = store.get(handling.key)
                return entry if entry is not None and entry.stored_at >= started else None

            async def publish(outcome: RowsOutcome) -> bool:
                try:
                    return await asyncio.to_thread(stored) is not None
                except StoreError:
                    return False

            value, turn = await fleet.run(
                handling.key, compute, publish, stored, wait=config.upstream_timeout
            )
            if turn is not Turn.FOLLOWER:
                return value  # type: ignore[no-any-return]
            if isinstance(value, Entry):
                return RowsOutcome(
                    decision="COALESCED",
                    status=value.status_code,
                    headers=[
                        (name.encode("latin-1"), data.encode("latin-1")) for name, data in value.headers
                    ],
                    content=value.content,
                    rows=len(batch.rows),
                )
            return await compute()  # every row is in the store now

        try:
            outcome, role = await self._batch_flights.run(
                handling.key, compute_in_fleet, timeout=config.upstream_timeout * 2
            )
        except TimeoutError:
            failure = UpstreamError("timeout", f"no answer within {config.upstream_timeout * 2:g}s")
            self._answer_failure(handling, "COALESCED", failure)
            return
        flow = handling.flow
        # A waiter shares the leader's answer: COALESCED when that went upstream, a HIT like the leader's
        # when every row came from the store (nothing was computed for anyone).
        shared_hit = role is Role.WAITER and outcome.decision == "HIT"
        decision = "COALESCED" if role is Role.WAITER and not shared_hit else outcome.decision
        from_cache = 0 if role is Role.WAITER and not shared_hit else outcome.from_cache
        self._count(handling, "rows", outcome.rows)
        if role is not Role.WAITER or shared_hit:
            self._count(handling, "rows_from_cache", outcome.from_cache)
            self._count(handling, "rows_upstream", 0 if shared_hit else outcome.upstream)
        if outcome.not_cached:
            missing = outcome.rows - outcome.from_cache
            flow.response = self._error(
                handling,
                "MISS",
                504,
                "not_cached",
                f"{missing} of the {outcome.rows} rows of this batch are not cached, and `Cache-Control: "
                "only-if-cached` forbids asking the upstream. Send the request without only-if-cached to have "
                "them computed.",
            )
            self._decide(handling, "MISS")
            return
        if outcome.failure is not None:
            self._answer_failure(handling, decision, outcome.failure)
            return
        if outcome.status >= 500 and handling.stale is not None:
            # No stale rows, but the whole answer was kept (an upstream that does not answer in rows).
            self._answer_from_entry(handling, handling.stale, "STALE", time.time())
            return
        if self._answer_opaque_server_error(
            handling, decision, outcome.status, outcome.headers, outcome.content
        ):
            return
        fields = list(outcome.headers)
        fields += _cache_headers(decision, handling.key_id, outcome.age if from_cache else None)
        fields.append((ROWS_HEADER.lower().encode(), f"{from_cache}/{outcome.rows}".encode()))
        fields.append((b"content-length", str(len(outcome.content)).encode()))
        flow.response = _response(outcome.status, outcome.reason, fields, outcome.content)
        served_from_store = decision in ("HIT", "STALE")
        flow.metadata["fp.upstream_seconds"] = (
            outcome.seconds_saved if served_from_store else outcome.upstream_seconds
        )
        flow.metadata["fp.rows"] = {
            "rows": outcome.rows,
            "from_cache": from_cache,
            "upstream": outcome.upstream,
        }
        self._decide(handling, decision)
        if from_cache:
            self._count(handling, "bytes_served_from_cache", outcome.bytes_from_cache)
            self._count(handling, "upstream_seconds_saved", outcome.seconds_saved)
            now = time.time()
            if self.versions.state(handling.origin, now) is Knowledge.DUE:
                self._check_version_in_background(request.scheme, request.host, request.port, handling.origin)

    def _rows_stored(self, batch: Batch, parts: KeyParts, since: float) -> bool:
        """Whether every row of `batch` is in the store, stored at `since` or later (a blocking read)."""
        store = self.store
        if store is None:
            return False
        try:
            for row in batch.rows:
                entry = store.get(RowCache.row_key(parts, row.key, parts.version, self._secret))
                if entry is None or entry.stored_at < since:
                    return False
        except StoreError:
            return False
        return True

    async def _after_rows(self, handling: _Handling, outcome: RowsOutcome) -> None:
        """Count the events of one row-by-row answer, learn the version, store an answer that had no rows."""
        assert self.config is not None and handling.parts is not None
        for why in outcome.store_errors:
            self._store_failed(handling, why)
        self._count(handling, "stores", outcome.stores)
        if outcome.evicted:
            self.counters.count("evictions", origin="", route="", model=None, amount=outcome.evicted)
        self._count(handling, "upstream_errors", outcome.upstream_errors)
        self._count(handling, "upstream_seconds", outcome.upstream_seconds)
        if outcome.version is not None:
            self.versions.learn(handling.origin, outcome.version, time.time())
        if outcome.unsplit is not None:  # the upstream does not answer in rows: keep the whole answer
            version = outcome.version if outcome.version is not None else handling.parts.version
            key = cache_key(dataclasses.replace(handling.parts, version=version), self._secret)
            await self._store(handling, _Fetched(outcome.unsplit, version, key, key_id(key)))

    # --- versions ------------------------------------------------------------------------------

    async def _check_version(self, scheme: str, host: str, port: int, origin: str) -> bool:
        """Ask the origin for its version now (one check per origin in flight); whether it answered."""
        config = self.config
        assert config is not None

        async def check() -> bool:
            timeout = min(config.upstream_timeout, VERSION_CHECK_TIMEOUT)
            headers = [(b"accept", b"application/json"), (b"user-agent", b"forward-proxy version check")]
            try:
                answer = await self.client.request(
                    scheme, host, port, "GET", config.version_check_path, headers, b"", timeout
                )
            except UpstreamError as exc:
                logger.info(f"version check of {origin} failed: {exc.message}")
                return False
            header = answer.header(config.version_header.lower().encode())
            now = time.time()
            if header is not None:
                changed = self.versions.learn(origin, header.decode("latin-1"), now)
                if changed:
                    logger.info(f"{origin} now runs version {header.decode('latin-1')}")
            elif 200 <= answer.status_code < 300:
                self.versions.learn(origin, None, now)
            else:
                if origin not in self._version_check_warned:
                    self._version_check_warned.add(origin)
                    logger.warning(
                        f"version check GET {origin}{config.version_check_path} answered "
                        f"{answer.status_code} without {config.version_header}; set version_check_path to a "
                        "cheap route of that upstream that carries it"
                    )
                self.versions.learn(origin, self.versions.current(origin), now)
            return True

        answered, _ = await self._checks.run(origin, check, timeout=VERSION_CHECK_TIMEOUT * 2)
        return answered

    def _check_version_in_background(self, scheme: str, host: str, port: int, origin: str) -> None:
        if self._checks.in_flight(origin):
            return
        task = asyncio.ensure_future(self._check_version(scheme, host, port, origin))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- counting ------------------------------------------------------------------------------

    def _count(self, handling: _Handling, name: str, amount: float = 1) -> None:
        self.counters.count(
            name, origin=handling.origin, route=handling.rule.label, model=handling.model, amount=amount
        )

    def _count_for(self, flow: http.HTTPFlow, name: str) -> None:
        meta = flow.metadata
        self.counters.count(
            name, origin=meta.get("fp.origin", ""), route=meta["fp.route"], model=meta.get("fp.model")
        )

    def _store_failed(self, handling: _Handling, why: str) -> None:
        handling.store_failed = True
        self._count(handling, "store_errors")
        now = time.monotonic()
        if now - self._store_error_logged_at >= STORE_ERROR_LOG_SECONDS:
            self._store_error_logged_at = now
            logger.warning(f"cache store failed, forwarding uncached: {why} (logged at most once a minute)")


def _header_map(fields: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
    """Request headers by lower-case name, repeated ones joined with ", " (as `Headers.get` does); one
    pass instead of a scan of every header per lookup."""
    header: dict[str, str] = {}
    for name, value in fields:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        header[key] = f"{header[key]}, {text}" if key in header else text
    return header


def _header(entry: Entry, name: str) -> str | None:
    return next((value for key, value in entry.headers if key == name), None)


def _cache_headers(decision: str, entry_id: str, age: str | None) -> list[tuple[bytes, bytes]]:
    fields = [(b"x-cache", decision.encode()), (b"x-cache-key", entry_id.encode())]
    if age is not None:
        fields.append((b"age", age.encode()))
    return fields


def _response(status: int, reason: bytes, fields: list[tuple[bytes, bytes]], content: bytes) -> http.Response:
    now = time.time()
    return http.Response(
        http_version=b"HTTP/1.1",
        status_code=status,
        reason=reason,
        headers=http.Headers(fields),
        content=content,
        trailers=None,
        timestamp_start=now,
        timestamp_end=now,
    )
